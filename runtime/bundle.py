"""Reading a bundle on the device: verified (hashes, and the signature when a trust store
is configured), with backbones memory-mapped. The format is specified in ``docs/bundle.md``.

Layout of a bundle directory (format version 2)::

    manifest.json                       the current version (checksummed, maybe signed)
    versions/000001.json ...            every retained version's manifest
    backbone-<sha16>.safetensors        backbone weights (content-addressed, shared)
    tasks/<nnn>-<name>-<sha8>.safetensors   one file per task (its kind's tensors + head)
    routers/<name>-<sha8>.safetensors   task-ID routers

The same bundle can be one file (``edgecl pack``, ``docs/bundle-file.md``); ``Bundle.open``
takes either. Files are immutable once written, so every version listed under
``versions/`` stays loadable until ``edgecl gc`` retires it.
"""

from __future__ import annotations

import hashlib
import mmap
from functools import cached_property
from pathlib import Path

import numpy as np

from .bundle_format import MAIN, MANIFEST, VERSIONS_DIR, parse_manifest, sha256_file, signed_body
from .errors import BundleError, UnknownTaskError
from .graph import Graph, GraphError, from_model
from .safetensors_mmap import parse_safetensors

TRUST_FROM_ENV = "env"  # Bundle.open's default: the trust store at $EDGECL_TRUST_STORE, if set


def version_file(version: int) -> str:
    return f"{VERSIONS_DIR}/{version:06d}.json"


class DirStore:
    """A bundle directory: the files a manifest names, read from disk."""

    def __init__(self, root: Path) -> None:
        self.path = root

    def where(self, rel: str) -> Path:
        return self.path / rel

    def size(self, rel: str) -> int | None:
        p = self.path / rel
        return p.stat().st_size if p.is_file() else None

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except FileNotFoundError:
            raise BundleError(self.path / rel, "missing file") from None
        except OSError as e:
            raise BundleError(self.path / rel, f"cannot read: {e.strerror or e}") from e

    def view(self, rel: str):
        """The file's bytes through a read-only memory map (pages load when touched)."""
        try:
            with open(self.path / rel, "rb") as f:
                if f.seek(0, 2) == 0:
                    return b""
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise BundleError(self.path / rel, "missing file") from None
        except OSError as e:
            raise BundleError(self.path / rel, f"cannot read: {e.strerror or e}") from e

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path / rel)

    def extract(self, rel: str) -> Path:
        return self.path / rel


def open_store(path: Path):
    """A directory, or a packed one-file bundle."""
    if path.is_dir():
        return DirStore(path)
    from .packfile import PackFile, is_pack

    if path.is_file() and is_pack(path):
        return PackFile(path)
    if path.is_file():
        raise BundleError(path, "neither a bundle directory nor a packed bundle file")
    raise BundleError(path, "no such bundle directory")


def _trust_store(trust):
    if trust == TRUST_FROM_ENV:
        from .signing import TrustStore

        return TrustStore.from_env()
    return trust


class Bundle:
    """A verified bundle version. ``Bundle.open(path)`` is the one way to get one."""

    def __init__(self, root: Path, manifest: dict, store=None) -> None:
        self.root = root
        self.manifest = manifest
        self.store = store if store is not None else DirStore(root)
        self.signer: str | None = None  # key id that signed this version (when checked)

    @classmethod
    def open(cls, path: str | Path, *, version: int | None = None, verify: bool = True,
             trust=TRUST_FROM_ENV, allow_rollback: bool = False) -> Bundle:
        """Open the current version (or ``version``) of the bundle at ``path``.

        With a trust store (``trust``; by default the one ``$EDGECL_TRUST_STORE`` names, if
        any) the manifest must carry a signature by one of its keys, and the current
        version may not be older than the newest this device has seen for the bundle
        unless ``allow_rollback``. ``verify`` checks every file's size and sha256."""
        root = Path(path)
        store = open_store(root)
        rel = MANIFEST if version is None else version_file(version)
        if store.size(rel) is None:
            if version is None and store.size("run.json") is not None:
                raise BundleError(root, "a training run, not a bundle: write its bundle first "
                                        f"(edgecl bundle {root} --out BUNDLE)")
            what = "manifest" if version is None else f"version {version}"
            raise BundleError(store.where(rel), f"missing: the bundle has no {what}")
        raw = store.read(rel)
        bundle = cls(root, parse_manifest(raw, store.where(rel)), store)
        ts = _trust_store(trust)
        if ts is not None:
            bundle.check_signature(ts, check_version=version is None, allow_rollback=allow_rollback)
        if verify:
            bundle.verify()
        return bundle

    # -- integrity ---------------------------------------------------------------
    def check_signature(self, trust, *, check_version: bool = True, allow_rollback: bool = False) -> str:
        """The manifest's signer by ``trust`` (a ``signing.TrustStore``); else a
        ``SignatureError`` naming the manifest. Also refuses a replayed older version."""
        where = self.where(MANIFEST)
        if self.manifest.get("upgraded_from") == 1:
            from .signing import UnsignedError

            raise UnsignedError(where, "unsigned: a format-1 bundle carries no signature; sign it "
                                       "with 'edgecl sign BUNDLE --key KEY' (a new, format-2 version)")
        self.signer = trust.verify_manifest(signed_body(self.manifest), self.manifest.get("signature"), where)
        if check_version:
            trust.check_version(self.manifest["bundle_id"], self.version, where,
                                allow_rollback=allow_rollback)
        return self.signer

    def verify(self, known: dict[str, str] | None = None) -> None:
        """Check every file the manifest lists: present, right size, right sha256.

        ``known`` (file -> sha256 already checked) skips those files and gains the ones
        checked now: files are content-addressed and immutable, so a session reopening a
        new version checks only its new files."""
        for rel, info in sorted(self.manifest["files"].items()):
            if known is not None and known.get(rel) == info["sha256"]:
                continue
            size = self.store.size(rel)
            if size is None:
                raise BundleError(self.where(rel), "missing file listed in the manifest")
            if size != info["bytes"]:
                raise BundleError(self.where(rel), f"size {size} bytes, the manifest says {info['bytes']}")
            if self.store.sha256(rel) != info["sha256"]:
                raise BundleError(self.where(rel), "sha256 mismatch: the file was modified or is corrupt")
            if known is not None:
                known[rel] = info["sha256"]

    def where(self, rel: str):
        """The path an error about file ``rel`` names."""
        return self.store.where(rel)

    # -- versions ------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def bundle_id(self) -> str | None:
        return self.manifest.get("bundle_id")

    def versions(self) -> list[int]:
        if isinstance(self.store, DirStore):
            d = self.root / VERSIONS_DIR
            return sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())
        return sorted(int(Path(n).stem) for n in self.store.names()
                      if n.startswith(VERSIONS_DIR + "/") and Path(n).stem.isdigit())

    @property
    def log(self) -> list[dict]:
        return self.manifest.get("log", [])

    # -- graphs and backbones ------------------------------------------------------
    @cached_property
    def graphs(self) -> dict[str, Graph]:
        out = {}
        for name, entry in self.manifest["graphs"].items():
            try:
                out[name] = from_model(entry)
            except GraphError as e:
                raise BundleError(self.where(MANIFEST), f"graph {name!r}: {e}") from None
        return out

    @property
    def main(self) -> str:
        """The bundle's main backbone: ``main``, or the first by name."""
        names = self.manifest["backbones"]
        return MAIN if MAIN in names else min(names)

    @property
    def model(self) -> dict:
        """The main backbone's model entry (arch, input shape, graph)."""
        return self.manifest["graphs"][self.manifest["backbones"][self.main]["graph"]]

    @property
    def graph(self) -> Graph:
        """The main backbone's graph."""
        return self.graphs[self.manifest["backbones"][self.main]["graph"]]

    def backbone_file(self, name: str | None = None) -> str:
        entry = self.manifest["backbones"].get(name or self.main)
        if entry is None:
            raise BundleError(self.where(MANIFEST), f"no backbone {name!r} (the bundle has: "
                                                    f"{', '.join(sorted(self.manifest['backbones']))})")
        return entry["file"]

    @cached_property
    def _backbones(self) -> dict[str, dict[str, np.ndarray]]:
        return {}

    def backbone_tensors(self, name: str | None = None) -> dict[str, np.ndarray]:
        """A backbone's tensors as read-only views into a memory map of its file."""
        name = name or self.main
        if name not in self._backbones:
            self._backbones[name] = self.read_tensors(self.backbone_file(name), mapped=True)[0]
        return self._backbones[name]

    @property
    def backbone(self) -> dict[str, np.ndarray]:
        """The main backbone's tensors (memory-mapped)."""
        return self.backbone_tensors()

    def read_tensors(self, rel: str, *, mapped: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """A safetensors file of the bundle: mapped views, or copies."""
        buf = self.store.view(rel) if mapped else self.store.read(rel)
        return parse_safetensors(buf, self.where(rel), copy=False)

    # -- tasks -----------------------------------------------------------------------
    @property
    def tasks(self) -> list[dict]:
        return self.manifest["tasks"]

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def task(self, key: str | int) -> dict:
        """A task entry by name, or by index (an int or a string of digits)."""
        for t in self.tasks:
            if t["name"] == key:
                return t
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if 0 <= i < len(self.tasks):
                return self.tasks[i]
            known = f"indices 0..{len(self.tasks) - 1}" if self.tasks else "no task"
            raise UnknownTaskError(f"{self.root}: no task {i}; the bundle holds {known} "
                                   f"({', '.join(self.task_names)})")
        known = ", ".join(self.task_names) or "none"
        raise UnknownTaskError(f"{self.root}: unknown task {key!r}; the bundle holds: {known}")

    def task_graph(self, key: str | int) -> Graph:
        info = self.task(key)
        name = info.get("graph", self.manifest["backbones"][self.main]["graph"])
        if name not in self.graphs:
            raise BundleError(self.where(MANIFEST), f"task {info['name']!r} names graph {name!r}, "
                                                    f"which the bundle does not hold")
        return self.graphs[name]

    def task_tensors(self, key: str | int) -> dict[str, np.ndarray]:
        return self.read_tensors(self.task(key)["file"], mapped=False)[0]

    def file_sha256(self, rel: str) -> str:
        info = self.manifest["files"].get(rel)
        return info["sha256"] if info else hashlib.sha256(self.store.read(rel)).hexdigest()
