"""Committing extra (compiled) files into a bundle as a new manifest version.

Same rules as ``bundle_writer.commit``: the files are content-addressed, written
atomically before the manifest, the manifest is swapped last, under the bundle's lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

from edgecl.compiler.bundle_writer import bundle_lock
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_format import (
    MANIFEST,
    VERSIONS_DIR,
    atomic_write_bytes,
    new_manifest_version,
    serialize_manifest,
)
from edgecl.runtime.errors import BundleError


def commit_files(root: str | Path, files: Mapping[str, bytes],
                 update: Callable[[dict], None] | None = None) -> int:
    """Write ``files`` (relative path -> bytes) into the bundle and commit a new version.

    ``update(manifest)`` edits the new manifest (e.g. its ``targets`` entry) before it is
    written. Returns the new version number.
    """
    root = Path(root)
    with bundle_lock(root):
        if not (root / MANIFEST).exists():
            raise BundleError(root / MANIFEST, "no bundle here to add files to")
        manifest = new_manifest_version(Bundle.open(root).manifest)
        for rel, data in sorted(files.items()):
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"bundle file path must be relative: {rel!r}")
            path = root / rel
            if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
                atomic_write_bytes(path, data)
            manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if update is not None:
            update(manifest)
        raw = serialize_manifest(manifest)
        atomic_write_bytes(root / VERSIONS_DIR / f"{manifest['version']:06d}.json", raw)
        atomic_write_bytes(root / MANIFEST, raw)
        return int(manifest["version"])
