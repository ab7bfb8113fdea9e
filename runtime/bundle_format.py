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
import uuid
from pathlib import Path

from .errors import BundleError

FORMAT_NAME = "edgecl-bundle"
FORMAT_VERSION = 2
READABLE = (1, 2)  # format 1 (one model, one backbone, mask-only tasks) is read as format 2
MANIFEST = "manifest.json"
VERSIONS_DIR = "versions"
MAIN = "main"  # the graph and backbone a bundle made from one model names


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signed_body(manifest: dict) -> bytes:
    """The bytes a manifest's signature covers: the canonical form of everything but the
    checksum and the signature itself."""
    return _canonical({k: v for k, v in manifest.items() if k not in ("checksum", "signature")})


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
    if fv not in READABLE:
        raise BundleError(
            path, f"unknown format version {fv!r}; this runtime reads versions "
                  f"{', '.join(map(str, READABLE))} (a newer edgecl wrote it?)"
        )
    try:
        expected = serialize_manifest(manifest)
    except (TypeError, ValueError) as e:
        raise BundleError(path, f"manifest holds values that are not plain JSON ({e})") from e
    if expected != bytes(raw):
        raise BundleError(path, "manifest checksum mismatch: the file was modified or is corrupt")
    return upgrade(manifest) if fv == 1 else manifest


def upgrade(manifest: dict) -> dict:
    """A format-1 manifest as the format-2 manifest it means (in memory; the next commit
    writes format 2): its model and backbone become graph and backbone ``main``, each task
    names them, its ``mask_kind`` becomes its ``kind``."""
    m = copy.deepcopy(manifest)
    m["format_version"] = FORMAT_VERSION
    m["upgraded_from"] = 1
    m["graphs"] = {MAIN: m.pop("model")}
    m["backbones"] = {MAIN: {"graph": MAIN, "file": m.pop("backbone")}}
    for t in m["tasks"]:
        t["kind"] = t.pop("mask_kind")
        t.setdefault("graph", MAIN)
        t.setdefault("backbone", MAIN)
        t.setdefault("depends", [])
        t.setdefault("revision", 1)
    m.setdefault("log", [])
    return m


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from the group
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
                "bundle_id": uuid.uuid4().hex, "graphs": {}, "backbones": {}, "tasks": [],
                "files": {}, "log": []}
    m = copy.deepcopy(previous)
    m["version"] = int(previous["version"]) + 1
    m["format_version"] = FORMAT_VERSION
    m.setdefault("bundle_id", uuid.uuid4().hex)  # a format-1 bundle gets its id now
    for k in ("checksum", "signature", "upgraded_from"):
        m.pop(k, None)
    return m
