"""Committing to a bundle: the one place a new version is written, on the host (bundling a
run, compiling) and on the device (a task it learned, its routers) alike.

Every commit is a new version. Data files are content-addressed and immutable, written
atomically before the manifest; the manifest is swapped last (temp, fsync, rename), so a
crash at any instant leaves the previous version loadable. A file whose bytes are already
on disk (an unchanged backbone) is never written again.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

import edgecl

from .bundle import Bundle
from .bundle_format import (
    MANIFEST,
    VERSIONS_DIR,
    atomic_write_bytes,
    new_manifest_version,
    serialize_manifest,
)
from .errors import BundleError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

# build(previous manifest or None, new manifest to edit) -> files to add {relpath: bytes}
Build = Callable[[dict | None, dict], Mapping[str, bytes]]


@contextmanager
def bundle_lock(root: Path) -> Iterator[None]:
    """One writer at a time per bundle directory."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def safe_name(name: str) -> str:
    return _SAFE.sub("_", name)


def commit_version(root: str | Path, build: Build) -> int:
    """Under the bundle's lock: let ``build`` edit the next manifest and name the files
    to add, write them, then the manifest. Returns the new version number."""
    root = Path(root)
    with bundle_lock(root):
        previous = Bundle.open(root).manifest if (root / MANIFEST).exists() else None
        manifest = new_manifest_version(previous)
        manifest.update(edgecl_version=edgecl.__version__,
                        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        files = build(previous, manifest)
        for rel, data in sorted(files.items()):
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"bundle file path must be relative: {rel!r}")
            path = root / rel
            if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
                atomic_write_bytes(path, data)
            manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        raw = serialize_manifest(manifest)
        atomic_write_bytes(root / VERSIONS_DIR / f"{manifest['version']:06d}.json", raw)
        atomic_write_bytes(root / MANIFEST, raw)
        return int(manifest["version"])


def commit_files(root: str | Path, files: Mapping[str, bytes],
                 update: Callable[[dict], None] | None = None) -> int:
    """Add ``files`` to an existing bundle; ``update(manifest)`` records what they are."""

    def build(previous: dict | None, manifest: dict) -> Mapping[str, bytes]:
        if previous is None:
            raise BundleError(Path(root) / MANIFEST, "no bundle here to add files to")
        if update is not None:
            update(manifest)
        return files

    return commit_version(root, build)


def task_storage(tensors: dict[str, np.ndarray], n_weights: int, file_bytes: int) -> dict:
    """Bytes a task adds, and bits per backbone weight (mask only, and with the head)."""
    mask = sum(v.nbytes for k, v in tensors.items() if k.startswith(("mask.", "gate.")))
    head = sum(v.nbytes for k, v in tensors.items() if k.startswith("head."))
    return {"mask_bytes": mask, "head_bytes": head, "file_bytes": file_bytes,
            "mask_bits_per_weight": 8.0 * mask / n_weights,
            "bits_per_weight": 8.0 * file_bytes / n_weights}


def _safetensors(tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    return st_save({k: np.asarray(v, order="C") for k, v in sorted(tensors.items())}, metadata=metadata)


def commit(root: str | Path, *, model: dict, backbone: Mapping[str, np.ndarray] | None,
           tasks: list[tuple[dict, dict[str, np.ndarray]]], stream: dict | None = None,
           routers: dict[str, tuple[dict[str, np.ndarray], dict[str, str]]] | None = None,
           default_router: str | None = None) -> int:
    """Add ``tasks`` (entry, tensors) to the bundle at ``root`` as one new version.

    ``model`` must equal the bundle's (if it exists); ``backbone`` None keeps the
    bundle's. ``routers`` (name -> (arrays, metadata)) replace those of the same name.
    Returns the new version number.
    """
    root = Path(root)

    def build(previous: dict | None, manifest: dict) -> dict[str, bytes]:
        if previous is not None and previous["model"] != model:
            raise BundleError(root / MANIFEST, "the bundle holds another model architecture")
        if backbone is None and previous is None:
            raise BundleError(root / MANIFEST, "a new bundle needs a backbone")
        manifest["model"] = model
        if stream is not None:
            manifest["stream"] = stream
        files: dict[str, bytes] = {}
        if backbone is not None:
            data = _safetensors(backbone, {"edgecl": "backbone"})
            rel = f"backbone-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
            if previous is not None and previous["backbone"] != rel:
                manifest["files"].pop(previous["backbone"], None)
            files[rel] = data
            manifest["backbone"] = rel
        names = {t["name"] for t in manifest["tasks"]}
        for entry, tensors in tasks:
            if entry["name"] in names:
                raise BundleError(root / MANIFEST, f"task {entry['name']!r} is already in the bundle")
            names.add(entry["name"])
            data = _safetensors(tensors, {"edgecl": "task", "name": entry["name"]})
            index = len(manifest["tasks"])
            digest = hashlib.sha256(data).hexdigest()[:8]
            rel = f"tasks/{index:03d}-{safe_name(entry['name'])}-{digest}.safetensors"
            files[rel] = data
            manifest["tasks"].append(dict(entry, index=index, file=rel,
                                          storage=task_storage(tensors, model["n_weights"], len(data))))
        for name, (arrays, meta) in sorted((routers or {}).items()):
            data = _safetensors(arrays, meta)
            rel = f"routers/{safe_name(name)}-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
            old = manifest.setdefault("routers", {}).get(name)
            if old is not None:
                manifest["files"].pop(old["file"], None)
            files[rel] = data
            manifest["routers"][name] = {"file": rel, "tasks": meta["tasks"].split("\n")}
        if default_router is not None:
            manifest["default_router"] = default_router
        return files

    return commit_version(root, build)
