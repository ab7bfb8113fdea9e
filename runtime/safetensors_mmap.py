"""Zero-copy reading of safetensors files.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian
header length, a JSON header, then the raw little-endian tensor bytes. The official
``safetensors.numpy.load_file`` copies every tensor into memory; on a device the
backbone must stay memory-mapped, so this reader maps the file once and hands out
read-only numpy views into the map.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from .errors import BundleError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100_000_000


def read_safetensors(path: str | Path, *, mapped: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Return (tensors, metadata). With ``mapped`` the arrays are read-only mmap views."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if mapped:
                size = path.stat().st_size
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            else:
                buf = f.read()
    except OSError as e:
        raise BundleError(path, f"cannot read: {e.strerror or e}") from e
    return parse_safetensors(buf, path, copy=not mapped)


def parse_safetensors(buf, where: object, *, copy: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of safetensors bytes in ``buf`` (bytes, an mmap, or a slice of
    one): views into ``buf`` (read-only when it is), or copies. Errors name ``where``."""
    if len(buf) < 8:
        raise BundleError(where, "not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > min(_MAX_HEADER, len(buf) - 8):
        raise BundleError(where, f"not a safetensors file (header length {n} exceeds the file)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(where, f"safetensors header is not valid JSON: {e}") from e
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(where, f"tensor {name!r} has a malformed header entry") from e
        count = int(np.prod(shape, dtype=np.int64))
        if hi - lo != count * dtype.itemsize or start + hi > len(buf) or lo < 0 or min(shape, default=0) < 0:
            raise BundleError(where, f"tensor {name!r} lies outside the file or has a wrong size")
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start + lo).reshape(shape)
        tensors[name] = arr.copy() if copy else arr
    return tensors, metadata
