"""The bundle's on-disk contract: manifest serialization, checksums, atomic writes.

The writer (``edgecl.runtime.bundle_write``, used by the host and by the device alike)
and the reader (``edgecl.runtime.bundle``) share these, so they live on the device side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import BundleError

FORMAT_NAME = "edgecl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERSIONS_DIR = "versions"


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def serialize_manifest(manifest: dict) -> bytes:
    """Deterministic bytes of a manifest, with its ``checksum`` field (re)computed.

    The checksum covers the canonical form of everything else; the reader also checks
    that the file's bytes are exactly this serialization, so any changed byte (even in
    whitespace) is caught.
    """
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    full = dict(body, checksum=hashlib.sha256(_canonical(body)).hexdigest())
    return (json.dumps(full, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def parse_manifest(raw: bytes, path: Path) -> dict:
    """Parse and check a manifest's bytes; raise ``BundleError`` naming ``path``."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(path, f"manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise BundleError(path, "manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(path, f"not an edgecl bundle manifest (format={manifest.get('format')!r})")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(
            path, f"unknown format version {fv!r}; this runtime reads version {FORMAT_VERSION}"
        )
    try:
        expected = serialize_manifest(manifest)
    except (TypeError, ValueError) as e:
        raise BundleError(path, f"manifest holds values that are not plain JSON ({e})") from e
    if expected != raw:
        raise BundleError(path, "manifest checksum mismatch: the file was modified or is corrupt")
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename, fsync of the directory. On failure
    (a full disk, say) the temp file is removed and the old file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def new_manifest_version(previous: dict | None) -> dict:
    """A deep copy of ``previous`` (or an empty manifest) with the next version number."""
    if previous is None:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "version": 1,
                "tasks": [], "files": {}}
    m = copy.deepcopy(previous)
    m["version"] = int(previous["version"]) + 1
    m.pop("checksum", None)
    return m
