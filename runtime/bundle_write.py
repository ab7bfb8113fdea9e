"""Committing to a bundle: the one place a new version is written, on the host (bundling a
run, compiling) and on the device (a task it learned and its routers) alike.

    with Transaction("bundle/", key=key) as tx:     # one writer at a time (a file lock)
        tx.add_task(entry, tensors)                  # validated by the task's kind
        tx.set_router("prototype", arrays, meta)
    # -> one new version holding both, or (any exception, a crash) none of it

Data files are content-addressed and immutable, written atomically before the manifest;
the manifest is swapped last (temp, fsync, rename), so a crash at any instant leaves the
previous version loadable and the new one either complete or absent. A file whose bytes
are already on disk (an unchanged backbone) is never written again. With a signing key
(``key=``, or ``$EDGECL_SIGNING_KEY``) the manifest is signed, and so is each task part
added (its ``origin``: which key, so which device, produced it).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

import edgecl

from .bundle import Bundle, DirStore, version_file
from .bundle_format import (
    MAIN,
    MANIFEST,
    VERSIONS_DIR,
    atomic_write_bytes,
    fsync_dir,
    new_manifest_version,
    parse_manifest,
    serialize_manifest,
    signed_body,
)
from .errors import BundleError
from .graph import from_model
from .kinds import TaskView, check_head, get_kind

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
KEY_FROM_ENV = "env"
GC_JOURNAL = ".gc-pending.json"


@contextmanager
def bundle_lock(root: Path) -> Iterator[None]:
    """One writer at a time per bundle directory."""
    if root.is_file():
        raise BundleError(root, "a packed bundle is read-only; 'edgecl unpack' it to commit to it")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def safe_name(name: str) -> str:
    return _SAFE.sub("_", name)


def _signing_key(key):
    if key == KEY_FROM_ENV:
        from .signing import SigningKey

        return SigningKey.from_env()
    if isinstance(key, (str, Path)):
        from .signing import SigningKey

        return SigningKey.load(Path(key))
    return key


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    # safetensors writes metadata in hash-map order: with more than one key the bytes (so a
    # content-addressed name) differ between processes. Backbones and tasks carry one key.
    return st_save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, metadata=metadata)


def _read_previous(root: Path) -> dict | None:
    """The current manifest (parsed and checked, files not re-hashed: the writer made
    them, and every reader checks them), or None for a new bundle."""
    path = root / MANIFEST
    if not path.exists():
        return None
    return parse_manifest(path.read_bytes(), path)


class _Overlay(DirStore):
    """The bundle directory with a transaction's not yet written files on top."""

    def __init__(self, root: Path, files: Mapping[str, bytes]) -> None:
        super().__init__(root)
        self.files = files

    def size(self, rel: str) -> int | None:
        return len(self.files[rel]) if rel in self.files else super().size(rel)

    def read(self, rel: str) -> bytes:
        return self.files[rel] if rel in self.files else super().read(rel)

    def view(self, rel: str):
        return self.files[rel] if rel in self.files else super().view(rel)

    def sha256(self, rel: str) -> str:
        return hashlib.sha256(self.files[rel]).hexdigest() if rel in self.files else super().sha256(rel)


class Transaction:
    """One new bundle version, built under the bundle's lock and written on success."""

    def __init__(self, root: str | Path, *, key=KEY_FROM_ENV, note: str | None = None) -> None:
        self.root = Path(root)
        self.key = _signing_key(key)
        self.note = note
        self.version: int | None = None
        self._lock = None

    # -- the context -----------------------------------------------------------------
    def __enter__(self) -> Transaction:
        self._lock = bundle_lock(self.root)
        self._lock.__enter__()
        try:
            self.previous = _read_previous(self.root)
            self.manifest = new_manifest_version(self.previous)
            self.files: dict[str, bytes] = {}
            self._digests: dict[str, str] = {}  # sha256 already computed while staging
            self.parts: list[str] = []
            self.superseded: list[dict] = []
            self._backbones: dict[str, Mapping[str, np.ndarray]] = {}
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.version = self._write()
        finally:
            self._lock.__exit__(None, None, None)

    @property
    def is_new(self) -> bool:
        return self.previous is None

    def bundle(self) -> Bundle:
        """The bundle as the previous version stands (for reading its files)."""
        if self.previous is None:
            raise BundleError(self.root / MANIFEST, "no bundle here yet")
        return Bundle(self.root, self.previous, DirStore(self.root))

    def candidate(self) -> Bundle:
        """The bundle as this version will be, before anything is written: the runtime runs
        on it (to check old tasks' outputs, to fit routers) over the very bytes it commits."""
        b = Bundle(self.root, self.manifest, _Overlay(self.root, self.files))
        return b

    # -- parts -------------------------------------------------------------------------
    def add_file(self, rel: str, data: bytes) -> str:
        if rel.startswith("/") or ".." in Path(rel).parts or Path(rel).name.startswith("."):
            raise ValueError(f"bundle file path must be relative and not hidden: {rel!r}")
        self.files[rel] = data
        return rel

    def drop_file(self, rel: str | None) -> None:
        """The file is no longer part of this version (it stays on disk for older ones)."""
        if rel is not None:
            self.manifest["files"].pop(rel, None)
            self.files.pop(rel, None)

    def add_graph(self, name: str, model: dict) -> None:
        have = self.manifest["graphs"].get(name)
        if have is not None and have != model:
            raise BundleError(self.root / MANIFEST, f"the bundle holds another model as graph {name!r}")
        from_model(model)  # validated before it is stored
        self.manifest["graphs"][name] = model

    def add_backbone(self, name: str, tensors: Mapping[str, np.ndarray], *, graph: str | None = None) -> str:
        """Store (or replace) backbone ``name`` for graph ``graph`` (default: same name)."""
        graph = graph or name
        if graph not in self.manifest["graphs"]:
            raise BundleError(self.root / MANIFEST, f"backbone {name!r}: no graph {graph!r} in the bundle")
        g = from_model(self.manifest["graphs"][graph])
        missing = [p for p in g.params if p not in tensors]
        if missing:
            raise BundleError(self.root / MANIFEST,
                              f"backbone {name!r} lacks {missing[0]} of graph {graph!r}")
        data = safetensors_bytes(tensors, {"edgecl": "backbone"})
        rel = f"backbone-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
        old = self.manifest["backbones"].get(name)
        if old is not None and old["file"] != rel:
            self.drop_file(old["file"])
        self.manifest["backbones"][name] = {"graph": graph, "file": rel}
        self.add_file(rel, data)
        self._backbones[name] = tensors
        self.parts.append(f"backbone:{name}")
        return rel

    def _backbone_tensors(self, name: str) -> Mapping[str, np.ndarray]:
        if name not in self._backbones:
            entry = self.manifest["backbones"].get(name)
            if entry is None:
                raise BundleError(self.root / MANIFEST, f"no backbone {name!r} in the bundle")
            self._backbones[name] = self.bundle().backbone_tensors(name)
        return self._backbones[name]

    def add_task(self, entry: dict, tensors: Mapping[str, np.ndarray], *, supersede: bool = False) -> dict:
        """Add a task (``entry``: name, kind, classes, method, metrics; optional graph,
        backbone, depends), validated by its kind. ``supersede`` replaces the task of that
        name with a new revision (its index kept), recorded in the version log."""
        m = self.manifest
        name = entry["name"]
        kind = get_kind(entry["kind"])
        main = MAIN if MAIN in m["backbones"] else min(m["backbones"], default=MAIN)
        backbone = entry.get("backbone", main)
        if backbone not in m["backbones"]:
            raise BundleError(self.root / MANIFEST, f"task {name!r}: no backbone {backbone!r} in the bundle")
        graph_name = entry.get("graph", m["backbones"][backbone]["graph"])
        if graph_name not in m["graphs"]:
            raise BundleError(self.root / MANIFEST, f"task {name!r}: no graph {graph_name!r} in the bundle")
        names = [t["name"] for t in m["tasks"]]
        deps = list(entry.get("depends", []))
        for d in deps:
            if d not in names or d == name:
                raise BundleError(self.root / MANIFEST, f"task {name!r} depends on {d!r}, which is not "
                                                        f"an earlier task of the bundle")
        old = next((t for t in m["tasks"] if t["name"] == name), None)
        if old is not None and not supersede:
            raise BundleError(self.root / MANIFEST, f"task {name!r} is already in the bundle")
        if old is None and supersede:
            raise BundleError(self.root / MANIFEST,
                              f"task {name!r} is not in the bundle; nothing to supersede")
        graph = from_model(m["graphs"][graph_name])
        data = safetensors_bytes(tensors, {"edgecl": "task"})
        index = old["index"] if old is not None else len(m["tasks"])
        digest = hashlib.sha256(data).hexdigest()
        rel = f"tasks/{index:03d}-{safe_name(name)}-{digest[:8]}.safetensors"
        self._digests[rel] = digest
        full = dict(entry, index=index, file=rel, kind=kind.name, graph=graph_name, backbone=backbone,
                    depends=deps, revision=1 if old is None else int(old.get("revision", 1)) + 1,
                    storage=kind.storage(tensors, graph, len(data)))
        full.pop("mask_kind", None)
        view = TaskView(full, tensors, graph, self._backbone_tensors(backbone), f"{self.root / rel}")
        kind.validate(view)
        check_head(view)
        if self.key is not None:
            from .signing import sign_part

            full["origin"] = sign_part(self.key, name, digest)
        if old is not None:
            self.drop_file(old["file"])
            m["tasks"][index] = full
            self.superseded.append({"task": name, "revision": old.get("revision", 1), "file": old["file"],
                                    "by_revision": full["revision"], "by_file": rel})
        else:
            m["tasks"].append(full)
        self.add_file(rel, data)
        self.parts.append(f"task:{name}")
        return full

    def set_router(self, name: str, arrays: Mapping[str, np.ndarray], meta: dict[str, str]) -> str:
        data = safetensors_bytes(arrays, meta)
        rel = f"routers/{safe_name(name)}-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
        old = self.manifest.setdefault("routers", {}).get(name)
        if old is not None and old["file"] != rel:
            self.drop_file(old["file"])
        self.manifest["routers"][name] = {"file": rel, "tasks": meta["tasks"].split("\n")}
        self.add_file(rel, data)
        self.parts.append(f"router:{name}")
        return rel

    # -- writing -------------------------------------------------------------------------
    def _write(self) -> int:
        m = self.manifest
        if not m["backbones"]:
            raise BundleError(self.root / MANIFEST, "a bundle needs a backbone")
        m.update(edgecl_version=edgecl.__version__,
                 created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        # files this commit brings into being: removed again if it fails (a full disk, say),
        # so a failed commit leaves the directory as it was (a SIGKILL leaves them for gc)
        created: list[Path] = []
        try:
            return self._write_files(m, created)
        except BaseException:
            for p in reversed(created):
                p.unlink(missing_ok=True)
            raise

    def _write_files(self, m: dict, created: list[Path]) -> int:
        for rel, data in sorted(self.files.items()):
            path = self.root / rel
            if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
                existed = path.exists()
                atomic_write_bytes(path, data)
                if not existed:
                    created.append(path)
            digest = self._digests.get(rel) or hashlib.sha256(data).hexdigest()
            m["files"][rel] = {"sha256": digest, "bytes": len(data)}
        entry = {"version": m["version"], "created_utc": m["created_utc"], "parts": self.parts}
        if self.superseded:
            entry["superseded"] = self.superseded
        if self.note:
            entry["note"] = self.note
        if self.key is not None:
            entry["signer"] = self.key.key_id
        m.setdefault("log", []).append(entry)
        if self.key is not None:
            from .signing import sign_manifest

            m["signature"] = sign_manifest(self.key, signed_body(m))
        raw = serialize_manifest(m)
        vpath = self.root / version_file(m["version"])
        existed = vpath.exists()
        atomic_write_bytes(vpath, raw)
        if not existed:
            created.append(vpath)
        atomic_write_bytes(self.root / MANIFEST, raw)
        return int(m["version"])


# -- the callers' shortcuts ---------------------------------------------------------------
def commit_files(root: str | Path, files: Mapping[str, bytes],
                 update: Callable[[dict], None] | None = None, *, key=KEY_FROM_ENV,
                 note: str | None = None) -> int:
    """Add ``files`` to an existing bundle; ``update(manifest)`` records what they are."""
    with Transaction(root, key=key, note=note) as tx:
        if tx.is_new:
            raise BundleError(Path(root) / MANIFEST, "no bundle here to add files to")
        if update is not None:
            update(tx.manifest)
        for rel, data in files.items():
            tx.add_file(rel, data)
        tx.parts.extend(f"file:{rel}" for rel in sorted(files))
    return int(tx.version)


def commit(root: str | Path, *, model: dict, backbone: Mapping[str, np.ndarray] | None,
           tasks: list[tuple[dict, dict[str, np.ndarray]]], stream: dict | None = None,
           routers: dict[str, tuple[dict[str, np.ndarray], dict[str, str]]] | None = None,
           default_router: str | None = None, key=KEY_FROM_ENV) -> int:
    """Add ``tasks`` (entry, tensors), and ``routers`` (name -> (arrays, metadata)), to
    the bundle at ``root`` as one new version, on the main graph and backbone.

    ``model`` must equal the bundle's main graph (if it exists); ``backbone`` None keeps
    the bundle's. Returns the new version number."""
    with Transaction(root, key=key) as tx:
        tx.add_graph(MAIN, model)
        if backbone is not None:
            tx.add_backbone(MAIN, backbone)
        elif tx.is_new:
            raise BundleError(Path(root) / MANIFEST, "a new bundle needs a backbone")
        if stream is not None:
            tx.manifest["stream"] = stream
        for entry, tensors in tasks:
            tx.add_task(entry, tensors)
        for name, (arrays, meta) in sorted((routers or {}).items()):
            tx.set_router(name, arrays, meta)
        if default_router is not None:
            tx.manifest["default_router"] = default_router
    return int(tx.version)


# -- retiring versions ---------------------------------------------------------------------
def rollback(root: str | Path, to: int, *, key=KEY_FROM_ENV) -> int:
    """A new version whose contents are those of version ``to`` (the version number still
    only grows, so a device's anti-rollback check accepts it). Returns the new version."""
    root = Path(root)
    target = Bundle.open(root, version=to, trust=None)  # its files verified: it must be whole
    with Transaction(root, key=key, note=f"rollback to version {to}") as tx:
        keep = {k: tx.manifest[k] for k in ("format", "format_version", "version", "bundle_id", "log")}
        body = {k: v for k, v in target.manifest.items()
                if k not in ("checksum", "signature", "upgraded_from", "log", "version", "bundle_id")}
        tx.manifest.clear()
        tx.manifest.update(body, **keep)
        tx.manifest["format_version"] = keep["format_version"]
        tx.parts.append(f"rollback:{to}")
    return int(tx.version)


def gc(root: str | Path, keep: int = 5) -> dict:
    """Retire all but the last ``keep`` versions (the current one always stays) and delete
    every file no retained version references; report what was freed.

    Crash-safe: the files to delete are first written to a journal (atomically); the
    deletions follow; a gc that was interrupted is finished by the next one (or by any
    commit's reader, which ignores files the manifest does not list)."""
    if keep < 1:
        raise ValueError(f"gc must keep at least 1 version, got {keep}")
    root = Path(root)
    journal = root / GC_JOURNAL
    with bundle_lock(root):
        if not (root / MANIFEST).exists():
            raise BundleError(root / MANIFEST, "no bundle here")
        current = _read_previous(root)
        pending = json.loads(journal.read_text())["delete"] if journal.exists() else []
        # an interrupted gc's retired versions stay retired (some of their files may be gone)
        gone = {int(Path(r).stem) for r in pending if r.startswith(VERSIONS_DIR + "/")}
        versions = sorted(int(p.stem) for p in (root / VERSIONS_DIR).glob("*.json")
                          if p.stem.isdigit() and int(p.stem) not in gone)
        retained = sorted(set(versions[-keep:]) | {int(current["version"])})
        referenced = {MANIFEST, *(version_file(v) for v in retained)}
        for v in retained:
            p = root / version_file(v)
            referenced |= set(parse_manifest(p.read_bytes(), p)["files"]) if p.exists() else set()
        referenced |= set(current["files"])
        doomed = list(pending)
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            hidden = any(part.startswith(".") for part in Path(rel).parts)
            if p.is_file() and not hidden and rel not in referenced:
                doomed.append(rel)
            elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
                doomed.append(rel)  # a crashed writer's temp file (no writer runs: we hold the lock)
        # never a file a retained version uses (a commit after an interrupted gc may have
        # referenced a listed file again: content-addressed files are reused, not rewritten)
        doomed = sorted(set(doomed) - referenced)
        sizes = {rel: (root / rel).stat().st_size for rel in doomed if (root / rel).is_file()}
        atomic_write_bytes(journal, json.dumps({"delete": doomed}).encode())
        # version manifests first: once a version's manifest is gone nobody opens it
        for rel in sorted(doomed, key=lambda r: not r.startswith(VERSIONS_DIR + "/")):
            (root / rel).unlink(missing_ok=True)
        for d in sorted({(root / rel).parent for rel in doomed}, reverse=True):
            if d != root:
                try:
                    d.rmdir()
                except OSError:
                    pass
        fsync_dir(root)
        journal.unlink()
        fsync_dir(root)
    is_version = [r.startswith(VERSIONS_DIR + "/") and Path(r).stem.isdigit() for r in doomed]
    return {"kept_versions": retained,
            "removed_versions": sorted(int(Path(r).stem)
                                       for r, v in zip(doomed, is_version, strict=True) if v),
            "removed_files": [r for r, v in zip(doomed, is_version, strict=True) if not v],
            "freed_bytes": sum(sizes.values())}


def migrate(root: str | Path, *, key=KEY_FROM_ENV) -> int:
    """Rewrite a format-1 bundle's current version as format 2 (a new version, same files)."""
    with Transaction(root, key=key, note="migrated to format 2") as tx:
        if tx.is_new:
            raise BundleError(Path(root) / MANIFEST, "no bundle here")
    return int(tx.version)
