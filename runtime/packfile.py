"""The one-file form of a bundle: one aligned, mmap-able file (see docs/bundle-file.md).

Layout (layout version 1, every integer little-endian)::

    0   8 bytes   magic b"EDGECLPK"
    8   u32       layout version (1)
    12  u32       alignment A (a power of two, 64 <= A <= 1 GiB; 4096 by default)
    16  u64       header length N
    24  N bytes   UTF-8 JSON {"files": {relpath: {"offset": int, "bytes": int}}}, sorted keys,
                  padded with spaces so that 24 + N is a multiple of A
    ... each file's bytes at its offset (a multiple of A), zero padding in between

A packed bundle holds exactly the files of the bundle directory (``manifest.json``,
``versions/*.json``, weights, task parts, compiled libraries, exports), without hidden
files or directories (``.lock``, ``.learn/``, ``.*.tmp``). ``PackFile`` maps it once,
read-only, and hands out zero-copy views of its files; a file starts at a multiple of A
inside a page-aligned map, so a safetensors tensor keeps the alignment safetensors gave it
and only the pages of tensors in use are ever faulted in. ``pack`` / ``unpack`` convert
between the forms, byte for byte. A packed bundle is read-only: commits need the directory.

Device side: the standard library only (no numpy, never torch).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
import tempfile
from pathlib import Path, PurePosixPath

from .bundle_format import fsync_dir
from .errors import BundleError

MAGIC = b"EDGECLPK"
LAYOUT_VERSION = 1
DEFAULT_ALIGNMENT = 4096
MIN_ALIGNMENT = 64
MAX_ALIGNMENT = 1 << 30
MANIFEST = "manifest.json"  # the bundle's own name for it (runtime/bundle_format.py)

_PREFIX = struct.Struct("<8sIIQ")  # magic, layout version, alignment, header length
_MAX_HEADER = 100_000_000  # like safetensors: a corrupt length must not make us read GBs
_CHUNK = 1 << 20  # 1 MiB: hashing / copying buffer

__all__ = ["MAGIC", "LAYOUT_VERSION", "DEFAULT_ALIGNMENT", "PackFile", "pack", "unpack", "is_pack",
           "check_alignment", "cache_root"]


# -- small helpers ---------------------------------------------------------------------
def check_alignment(alignment: int) -> None:
    """Raise ``ValueError`` unless ``alignment`` is a power of two in [64, 1 GiB]."""
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < MIN_ALIGNMENT
            or alignment > MAX_ALIGNMENT or alignment & (alignment - 1)):
        raise ValueError(f"alignment must be a power of two from {MIN_ALIGNMENT} to {MAX_ALIGNMENT}, "
                         f"got {alignment!r}")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _relpath_problem(rel: object) -> str | None:
    """Why ``rel`` may not name a file of a packed bundle (None when it may).

    Unpacking writes ``out_dir / rel``, so anything that could leave ``out_dir`` or name
    the same file two ways is refused."""
    if not isinstance(rel, str) or not rel:
        return "the path is empty or not a string"
    if rel.startswith("/"):
        return "the path is absolute (starts with '/')"
    if "\\" in rel or "\0" in rel:
        return "the path holds a backslash or a NUL byte"
    parts = rel.split("/")
    if ".." in parts:
        return "the path holds '..'"
    if any(p in ("", ".") for p in parts):
        return "the path holds an empty or '.' component"
    return None


def _atomic_file(dest: Path, fill) -> None:
    """Create ``dest`` so that a crash leaves the old file or the whole new one.

    ``fill(f)`` writes the content into a temp file in the destination directory (hidden,
    ``.NAME.*.tmp``, so a bundle walk never picks it up); then fsync, chmod 0644 (mkstemp
    makes 0600), rename, fsync of the directory. Any failure removes the temp file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _copy_range(fd: int, offset: int, length: int, out, where: str) -> None:
    """Copy ``length`` bytes of ``fd`` from ``offset`` into ``out`` with ``os.pread``: the
    pages go through the page cache, never into this process's mapping (its RSS)."""
    end = offset + length
    while offset < end:
        block = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not block:
            raise BundleError(where, "the file ended early (truncated while being read)")
        out.write(block)
        offset += len(block)


class _Hasher:
    """A write-only sink that hashes what it is given (``_copy_range`` into a digest)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, block: bytes) -> None:
        self.h.update(block)


def cache_root() -> Path:
    """``$EDGECL_CACHE`` (default ``~/.cache/edgecl``), as the rest of edgecl uses it."""
    return Path(os.environ.get("EDGECL_CACHE", "~/.cache/edgecl")).expanduser()


def is_pack(path: str | Path) -> bool:
    """True when ``path`` is a regular file that starts with the packed-bundle magic."""
    try:
        p = Path(path)
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# -- reading ---------------------------------------------------------------------------
class PackFile:
    """A packed bundle, mapped once read-only and validated: ``PackFile(path)``.

    ``view(rel)`` is a zero-copy ``memoryview`` of one file (``np.frombuffer`` takes it);
    ``sha256`` reads with ``os.pread`` so verifying a bundle does not map its weights into
    the process; ``extract`` gives a real path for loaders that need one (shared libraries).
    Views stay valid after ``close()``: the map is released when the last one is gone.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._mv: memoryview | None = None
        self._entries: dict[str, tuple[int, int]] = {}
        self._digests: dict[str, str] = {}
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise BundleError(self.path, "no such packed bundle file") from None
        except IsADirectoryError:
            raise BundleError(self.path, "is a directory, not a packed bundle file") from None
        except OSError as e:
            raise BundleError(self.path, f"cannot read: {e.strerror or e}") from e
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(self.path, "not a regular file")
            self.file_size = st.st_size
            if self.file_size < _PREFIX.size:
                raise BundleError(self.path, f"not a packed bundle (only {self.file_size} bytes, "
                                             f"shorter than its {_PREFIX.size}-byte prefix)")
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self._mv = memoryview(self._mm)
            self._entries = self._validate()
        except OSError as e:  # mmap itself (address space, a file system without mmap)
            self.close()
            raise BundleError(self.path, f"cannot map: {e.strerror or e}") from e
        except BaseException:
            self.close()
            raise

    def _validate(self) -> dict[str, tuple[int, int]]:
        """Check every byte range and name the header claims; return rel -> (offset, bytes)."""
        path, size = self.path, self.file_size
        magic, version, alignment, n = _PREFIX.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise BundleError(path, f"not a packed edgecl bundle (magic {magic!r}, expected {MAGIC!r})")
        if version != LAYOUT_VERSION:
            raise BundleError(path, f"unknown packed layout version {version}; this runtime reads "
                                    f"version {LAYOUT_VERSION}")
        try:
            check_alignment(alignment)
        except ValueError as e:
            raise BundleError(path, f"bad alignment in the prefix: {e}") from None
        self.alignment, self.layout_version = alignment, version
        data_start = _PREFIX.size + n
        if n > _MAX_HEADER or data_start > size:
            raise BundleError(path, f"header length {n} runs past the end of the file ({size} bytes): "
                                    f"truncated or corrupt")
        try:
            header = json.loads(bytes(self._mm[_PREFIX.size:data_start]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(path, f"header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict) or set(header) != {"files"} or not isinstance(header["files"], dict):
            raise BundleError(path, 'header must be a JSON object {"files": {...}} and nothing else')
        entries: dict[str, tuple[int, int]] = {}
        for rel, info in header["files"].items():
            where = f"{path}:{rel}"
            problem = _relpath_problem(rel)
            if problem:
                raise BundleError(where, f"bad entry name: {problem}")
            if not isinstance(info, dict) or set(info) != {"offset", "bytes"} or not all(
                    type(info[k]) is int and info[k] >= 0 for k in ("offset", "bytes")):
                raise BundleError(where, 'entry must be {"offset": int >= 0, "bytes": int >= 0}')
            off, length = info["offset"], info["bytes"]
            if off % alignment:
                raise BundleError(where, f"offset {off} is not a multiple of the alignment {alignment}")
            if off < data_start:
                raise BundleError(where, f"offset {off} lies inside the header (data starts at {data_start})")
            if off + length > size:
                raise BundleError(where, f"bytes {off}..{off + length} run past the end of the file "
                                         f"({size} bytes): truncated or corrupt")
            entries[rel] = (off, length)
        # Overlaps: sorted by offset, each non-empty range must end before the next starts.
        spans = sorted((o, o + n, rel) for rel, (o, n) in entries.items() if n)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise BundleError(f"{path}:{second}", f"overlaps entry {first!r} (bytes {start}..{end})")
        # A name that is also a directory of another ("a" and "a/b") cannot be unpacked.
        dirs = {str(p) for rel in entries for p in PurePosixPath(rel).parents if str(p) != "."}
        clash = sorted(dirs & entries.keys())
        if clash:
            raise BundleError(f"{path}:{clash[0]}", "is both a file and a directory of other entries")
        return entries

    # -- contents ------------------------------------------------------------------------
    def where(self, rel: str) -> str:
        """How errors name a file inside the pack."""
        return f"{self.path}:{rel}"

    def names(self) -> list[str]:
        """Every file of the packed bundle, sorted (``manifest.json``, ``versions/...``, data)."""
        return sorted(self._entries)

    def __contains__(self, rel: object) -> bool:
        return rel in self._entries

    def size(self, rel: str) -> int | None:
        """The file's length in bytes, or None when the packed bundle has no such file."""
        entry = self._entries.get(rel)
        return None if entry is None else entry[1]

    def _entry(self, rel: str) -> tuple[int, int]:
        try:
            return self._entries[rel]
        except KeyError:
            raise BundleError(f"{self.path}:{rel}", "not in the packed bundle") from None

    def view(self, rel: str) -> memoryview:
        """A read-only, zero-copy view of one file: a slice of the map (pages load on use)."""
        off, length = self._entry(rel)
        if self._mv is None:
            raise BundleError(self.path, "the packed bundle is closed")
        return self._mv[off:off + length]

    def read(self, rel: str) -> bytes:
        """A copy of one file's bytes (for small files: manifests, versions)."""
        return bytes(self.view(rel))

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise BundleError(self.path, "the packed bundle is closed")
        return self._fd

    def sha256(self, rel: str) -> str:
        """Hex sha256 of one file, read with ``os.pread`` (never through the map, so a verify
        pass does not leave the whole backbone resident in this process)."""
        if rel not in self._digests:  # the file is immutable while it is mapped
            off, length = self._entry(rel)
            h = _Hasher()
            _copy_range(self._fd_or_raise(), off, length, h, f"{self.path}:{rel}")
            self._digests[rel] = h.h.hexdigest()
        return self._digests[rel]

    def extract(self, rel: str) -> Path:
        """A real file holding ``rel``'s bytes, for loaders that need a path (TVM's shared
        libraries): ``$EDGECL_CACHE/packed/<sha256[:16]>/<basename>``, written once
        (atomically) and reused while it is there with the right size."""
        off, length = self._entry(rel)
        digest = self.sha256(rel)
        dest = cache_root() / "packed" / digest[:16] / PurePosixPath(rel).name
        try:
            if dest.is_file() and dest.stat().st_size == length:
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = self._fd_or_raise()
            _atomic_file(dest, lambda f: _copy_range(fd, off, length, f, f"{self.path}:{rel}"))
        except OSError as e:
            raise BundleError(dest, f"cannot extract {rel} from {self.path}: {e.strerror or e}") from e
        return dest

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file. Views handed out keep the map alive until they are dropped
        (an mmap cannot be closed under live buffers), so closing never invalidates one."""
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views (or arrays over them) still exist: the map goes with the last one
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PackFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PackFile({str(self.path)!r}, {len(self._entries)} files)"


# -- writing ---------------------------------------------------------------------------
def _bundle_files(src: Path) -> list[tuple[str, Path, int]]:
    """(relpath, path, size) of every file a packed bundle holds, sorted by relpath.

    Hidden files and directories are the bundle's private state (``.lock``, ``.learn/``,
    ``.*.tmp`` of a write in flight) and stay out. Symlinks and special files are refused:
    a bundle's files must be the bytes its manifest hashes, not a pointer elsewhere."""
    out: list[tuple[str, Path, int]] = []

    def walk(d: Path, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise BundleError(d, f"cannot list: {e.strerror or e}") from e
        for e in entries:
            if e.name.startswith("."):
                continue
            p, rel = Path(e.path), prefix + e.name
            if e.is_symlink():
                raise BundleError(p, "is a symlink; a bundle directory may hold only regular files")
            if e.is_dir(follow_symlinks=False):
                walk(p, rel + "/")
            elif e.is_file(follow_symlinks=False):
                out.append((rel, p, e.stat(follow_symlinks=False).st_size))
            else:
                raise BundleError(p, "is neither a regular file nor a directory (a fifo, a socket?)")

    walk(src, "")
    out.sort(key=lambda t: t[0])  # one global order (walk order already is, but say so)
    for rel, p, _ in out:
        problem = _relpath_problem(rel)
        if problem:
            raise BundleError(p, f"cannot pack this name: {problem}")
    return out


def _layout(files: list[tuple[str, int]], alignment: int) -> tuple[bytes, dict[str, int]]:
    """The padded header and each file's offset. Offsets depend on the header's length and
    the header holds the offsets, so grow the data start one alignment step at a time until
    the header fits in front of it (a step or two in practice)."""
    data_start = _align(_PREFIX.size + 2, alignment)
    while True:
        offsets, cursor = {}, data_start
        for rel, n in files:
            offsets[rel] = cursor
            cursor = _align(cursor + n, alignment)
        header = json.dumps({"files": {rel: {"bytes": n, "offset": offsets[rel]} for rel, n in files}},
                            sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        room = data_start - _PREFIX.size
        if len(header) <= room:
            return header + b" " * (room - len(header)), offsets
        data_start = _align(_PREFIX.size + len(header), alignment)


def pack(src_dir: str | Path, out_file: str | Path, *, alignment: int = DEFAULT_ALIGNMENT,
         overwrite: bool = False) -> dict:
    """Write the bundle directory ``src_dir`` as one packed file ``out_file``, atomically.

    Deterministic: the same directory packs to the same bytes. Returns a report:
    ``{"path", "files", "bytes" (of the packed file), "data_bytes", "padding", "alignment"}``.
    """
    check_alignment(alignment)
    src, out = Path(src_dir), Path(out_file)
    if not src.is_dir():
        raise BundleError(src, "no such bundle directory")
    if not (src / MANIFEST).is_file() or (src / MANIFEST).is_symlink():
        raise BundleError(src / MANIFEST, "missing: not a bundle directory (no manifest.json)")
    if out.is_dir():
        raise BundleError(out, "is a directory; give the packed bundle a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise BundleError(out, "already exists (overwrite it with --force / overwrite=True)")
    # Inside the bundle, the next pack would swallow this one.
    if out.resolve().parent.is_relative_to(src.resolve()):
        raise BundleError(out, f"lies inside the bundle directory {src}; write it elsewhere")
    files = _bundle_files(src)
    header, offsets = _layout([(rel, n) for rel, _, n in files], alignment)
    total = _PREFIX.size + len(header)
    if files:
        rel, _, n = files[-1]
        total = offsets[rel] + n
    data_bytes = sum(n for _, _, n in files)

    def fill(f) -> None:
        f.write(_PREFIX.pack(MAGIC, LAYOUT_VERSION, alignment, len(header)))
        f.write(header)
        pos = _PREFIX.size + len(header)
        for rel, p, n in files:
            gap = offsets[rel] - pos  # zero padding, < alignment (which may be large)
            while gap:
                f.write(bytes(min(gap, _CHUNK)))
                gap -= min(gap, _CHUNK)
            try:
                with open(p, "rb") as g:
                    written = 0
                    while block := g.read(min(_CHUNK, n - written + 1)):
                        written += len(block)
                        if written > n:
                            break
                        f.write(block)
            except OSError as e:
                raise BundleError(p, f"cannot read: {e.strerror or e}") from e
            if written != n:
                raise BundleError(p, f"changed while being packed (was {n} bytes)")
            pos = offsets[rel] + n

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _atomic_file(out, fill)
    except OSError as e:
        raise BundleError(out, f"cannot write: {e.strerror or e}") from e
    return {"path": str(out), "files": len(files), "bytes": total, "data_bytes": data_bytes,
            "padding": total - _PREFIX.size - len(header.rstrip(b" ")) - data_bytes,
            "alignment": alignment}


def _makedirs(d: Path) -> None:
    """``mkdir -p`` that also makes each new directory's entry durable (fsync of its
    parent) before any file goes in, so a synced file is never in a lost directory."""
    if d.is_dir():
        return
    _makedirs(d.parent)
    d.mkdir(exist_ok=True)
    fsync_dir(d.parent)


def _same_file(pk: PackFile, rel: str, p: Path) -> bool:
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size != pk.size(rel):
            return False
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    except OSError:
        return False
    return h.hexdigest() == pk.sha256(rel)


def unpack(pack_file: str | Path, out_dir: str | Path) -> dict:
    """Recreate the bundle directory of ``pack_file`` in ``out_dir``, byte for byte.

    ``out_dir`` must be absent, empty, or hold only files identical to the packed ones
    (so an unpack cut short by a crash can simply be run again); ``manifest.json`` is
    written last, so a partial directory is never a loadable bundle. Hidden files already
    there (``.lock``) are left alone. Returns ``{"path", "files", "written", "bytes"}``."""
    out = Path(out_dir)
    with PackFile(pack_file) as pk:
        names = pk.names()
        if out.exists() and not out.is_dir():
            raise BundleError(out, "exists and is not a directory")
        present = [rel for rel, _, _ in _bundle_files(out)] if out.is_dir() else []
        for rel in present:
            if rel not in pk or not _same_file(pk, rel, out / rel):
                raise BundleError(out, f"is not empty and its {rel} differs from {pk.path}; "
                                       f"unpack into a new directory")
        have = set(present)
        todo = sorted((r for r in names if r not in have), key=lambda r: (r == MANIFEST, r))
        fd = pk._fd_or_raise()
        try:
            _makedirs(out)
            for rel in todo:
                dest = out / rel
                _makedirs(dest.parent)
                off, length = pk._entry(rel)
                _atomic_file(dest, lambda f, off=off, length=length, rel=rel:
                             _copy_range(fd, off, length, f, f"{pk.path}:{rel}"))
        except OSError as e:
            raise BundleError(out, f"cannot write: {e.strerror or e}") from e
        return {"path": str(out), "files": len(names), "written": len(todo),
                "bytes": sum(pk.size(r) or 0 for r in names)}
