"""Reading a bundle on the device: verified, with the backbone memory-mapped.

Layout of a bundle directory (format version 1)::

    manifest.json                       the current version (checksummed)
    versions/000001.json ...            every committed version's manifest
    backbone-<sha12>.safetensors        backbone weights (content-addressed, shared)
    tasks/<nnn>-<name>-<sha8>.safetensors   one file per task: masks + head

Files are immutable once written, so every version listed under ``versions/`` stays
loadable; committing a version only adds files and swaps ``manifest.json``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .bundle_format import MANIFEST, VERSIONS_DIR, parse_manifest, sha256_file
from .errors import BundleError, UnknownTaskError
from .graph import Graph, GraphError, from_model
from .safetensors_mmap import read_safetensors


def _version_path(root: Path, version: int) -> Path:
    return root / VERSIONS_DIR / f"{version:06d}.json"


class Bundle:
    """A verified bundle version. ``Bundle.open(path)`` is the one way to get one."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, version: int | None = None, verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError(root, "no such bundle directory")
        mpath = root / MANIFEST if version is None else _version_path(root, version)
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError:
            what = "manifest" if version is None else f"version {version}"
            raise BundleError(mpath, f"missing: the bundle has no {what}") from None
        except OSError as e:
            raise BundleError(mpath, f"cannot read: {e}") from e
        bundle = cls(root, parse_manifest(raw, mpath))
        if verify:
            bundle.verify()
        return bundle

    # -- integrity ---------------------------------------------------------------
    def verify(self, known: dict[str, str] | None = None) -> None:
        """Check every file the manifest lists: present, right size, right sha256.

        ``known`` (file -> sha256 already checked) skips those files and gains the ones
        checked now: files are content-addressed and immutable, so a session reopening a
        new version checks only its new files."""
        for rel, info in sorted(self.manifest["files"].items()):
            if known is not None and known.get(rel) == info["sha256"]:
                continue
            p = self.root / rel
            if not p.is_file():
                raise BundleError(p, "missing file listed in the manifest")
            size = p.stat().st_size
            if size != info["bytes"]:
                raise BundleError(p, f"size {size} bytes, the manifest says {info['bytes']}")
            digest = sha256_file(p)
            if digest != info["sha256"]:
                raise BundleError(p, "sha256 mismatch: the file was modified or is corrupt")
            if known is not None:
                known[rel] = info["sha256"]

    # -- contents ----------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @cached_property
    def graph(self) -> Graph:
        """The model graph (a format-1 layer table is read as one)."""
        try:
            return from_model(self.model)
        except GraphError as e:
            raise BundleError(self.root / MANIFEST, f"model: {e}") from None

    @property
    def tasks(self) -> list[dict]:
        return self.manifest["tasks"]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def versions(self) -> list[int]:
        d = self.root / VERSIONS_DIR
        return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())

    def task(self, key: str | int) -> dict:
        """A task entry by name, or by index (an int or a string of digits)."""
        for t in self.tasks:
            if t["name"] == key:
                return t
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if 0 <= i < len(self.tasks):
                return self.tasks[i]
        known = ", ".join(self.task_names) or "none"
        raise UnknownTaskError(f"{self.root}: unknown task {key!r}; the bundle holds: {known}")

    @cached_property
    def backbone(self) -> dict[str, np.ndarray]:
        """Backbone tensors as read-only views into a memory map of the file."""
        tensors, _ = read_safetensors(self.root / self.manifest["backbone"], mapped=True)
        return tensors

    def task_tensors(self, key: str | int) -> dict[str, np.ndarray]:
        tensors, _ = read_safetensors(self.root / self.task(key)["file"], mapped=False)
        return tensors
