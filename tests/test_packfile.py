"""The one-file form of a bundle (runtime/packfile.py): layout, round trip, checks, CLI.

The bundle directory is built by hand (not by edgecl's writer): the pack format only
cares about files, and must not break when the manifest's contents change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgecl.runtime.errors import BundleError
from edgecl.runtime.packfile import MAGIC, PackFile, is_pack, pack, unpack
from edgecl.tools import pack_cmd

PREFIX = struct.Struct("<8sIIQ")
RNG = np.random.default_rng(0)
BACKBONE = {"fc1.weight": RNG.standard_normal((64, 32)).astype(np.float32),
            "fc1.bias": RNG.standard_normal(64).astype(np.float32),
            "steps": np.arange(5, dtype=np.int64),
            "flags": np.array([1, 0, 1], dtype=np.uint8)}
TASK = {"mask.fc1": RNG.integers(0, 255, 256, dtype=np.uint8),
        "head.weight": RNG.standard_normal((10, 64)).astype(np.float16)}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle directory with every kind of file a real one holds, plus private state."""
    root = tmp_path / "bundle"
    (root / "versions").mkdir(parents=True)
    (root / "tasks").mkdir()
    (root / "targets").mkdir()
    manifest = {"format": "edgecl-bundle", "format_version": 1, "version": 1}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (root / "versions" / "000001.json").write_text(json.dumps(manifest, indent=1) + "\n")
    save_file(BACKBONE, str(root / "backbone-0123456789ab.safetensors"))
    save_file(TASK, str(root / "tasks" / "000-t0-01234567.safetensors"))
    (root / "targets" / "host.so").write_bytes(bytes(range(256)) * 37 + b"\x7fELF")
    (root / "targets" / "empty.bin").write_bytes(b"")
    (root / ".lock").write_text("1234\n")  # private: never packed
    (root / ".learn").mkdir()
    (root / ".learn" / "state.json").write_text("{}")
    (root / ".manifest.json.abc.tmp").write_text("half a write")
    return root


PACKED = ["backbone-0123456789ab.safetensors", "manifest.json", "targets/empty.bin", "targets/host.so",
          "tasks/000-t0-01234567.safetensors", "versions/000001.json"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def _header(path: Path) -> tuple[tuple, dict]:
    raw = path.read_bytes()
    prefix = PREFIX.unpack_from(raw, 0)
    return prefix, json.loads(raw[PREFIX.size:PREFIX.size + prefix[3]])


def _write_raw(path: Path, files: dict, data: bytes = b"", *, magic: bytes = MAGIC, version: int = 1,
               alignment: int = 64, header_len: int | None = None) -> Path:
    """A hand-made pack file: header ``{"files": files}`` padded to ``alignment``, then ``data``."""
    header = json.dumps({"files": files}).encode()
    header += b" " * (-(PREFIX.size + len(header)) % alignment)
    n = len(header) if header_len is None else header_len
    path.write_bytes(PREFIX.pack(magic, version, alignment, n) + header + data)
    return path


# -- round trip and layout ---------------------------------------------------------------
def test_round_trip_is_byte_identical(bundle, tmp_path):
    report = pack(bundle, tmp_path / "b.edgecl")
    assert report["files"] == len(PACKED)
    assert report["data_bytes"] == sum(len(b) for b in _files(bundle).values())
    assert report["bytes"] == (tmp_path / "b.edgecl").stat().st_size
    assert report["padding"] > 0
    with PackFile(tmp_path / "b.edgecl") as pk:
        assert pk.names() == PACKED  # hidden files and dirs stayed out
        assert pk.size(".lock") is None and pk.size("targets/empty.bin") == 0
        assert pk.read("manifest.json") == (bundle / "manifest.json").read_bytes()
    r = unpack(tmp_path / "b.edgecl", tmp_path / "out")
    assert r["written"] == len(PACKED)
    assert _files(tmp_path / "out") == _files(bundle)
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind
    # The unpacked directory packs back to the same bytes.
    pack(tmp_path / "out", tmp_path / "again.edgecl")
    assert (tmp_path / "again.edgecl").read_bytes() == (tmp_path / "b.edgecl").read_bytes()


def test_packing_is_deterministic(bundle, tmp_path):
    pack(bundle, tmp_path / "1.edgecl")
    os.utime(bundle / "manifest.json", (1, 1))  # times are not part of the content
    (bundle / ".lock").write_text("another pid\n")
    pack(bundle, tmp_path / "2.edgecl")
    assert (tmp_path / "1.edgecl").read_bytes() == (tmp_path / "2.edgecl").read_bytes()


@pytest.mark.parametrize("alignment", [64, 4096, 65536])
def test_every_offset_is_aligned(bundle, tmp_path, alignment):
    out = tmp_path / "b.edgecl"
    pack(bundle, out, alignment=alignment)
    (magic, version, align, n), header = _header(out)
    assert (magic, version, align) == (MAGIC, 1, alignment)
    assert (PREFIX.size + n) % alignment == 0  # the header is padded up to the first file
    raw = out.read_bytes()
    originals = _files(bundle)
    for rel, e in header["files"].items():
        assert e["offset"] % alignment == 0, rel
        assert raw[e["offset"]:e["offset"] + e["bytes"]] == originals[rel]
    ends = sorted((e["offset"], e["offset"] + e["bytes"]) for e in header["files"].values())
    gaps = b"".join(raw[end:start] for (_, end), (start, _) in zip(ends, ends[1:], strict=False))
    assert set(gaps) <= {0}  # padding between files is zeros


def test_view_is_zero_copy_and_numpy_reads_tensors(bundle, tmp_path):
    pack(bundle, tmp_path / "b.edgecl")
    with PackFile(tmp_path / "b.edgecl") as pk:
        v = pk.view("backbone-0123456789ab.safetensors")
        assert v.readonly and isinstance(v.obj, type(pk._mm))  # a slice of the map itself
        (n,) = struct.unpack("<Q", v[:8])
        header = json.loads(bytes(v[8:8 + n]))
        header.pop("__metadata__", None)
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            dtype = np.dtype(BACKBONE[name].dtype)
            arr = np.frombuffer(v, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=8 + n + lo)
            np.testing.assert_array_equal(arr.reshape(info["shape"]), BACKBONE[name])
            assert arr.flags.aligned and not arr.flags.writeable
            assert arr.ctypes.data % dtype.itemsize == 0
        with pytest.raises(BundleError, match=r"b\.edgecl:nope\.bin: not in the packed bundle"):
            pk.view("nope.bin")
        kept = pk.view("targets/host.so")
    assert bytes(kept[-4:]) == b"\x7fELF"  # a view outlives close(): the map goes with it


def test_sha256_matches_hashlib(bundle, tmp_path):
    pack(bundle, tmp_path / "b.edgecl")
    with PackFile(tmp_path / "b.edgecl") as pk:
        for rel, data in _files(bundle).items():
            assert pk.sha256(rel) == hashlib.sha256(data).hexdigest(), rel


def test_extract_writes_once_and_reuses(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    pack(bundle, tmp_path / "b.edgecl")
    data = (bundle / "targets" / "host.so").read_bytes()
    with PackFile(tmp_path / "b.edgecl") as pk:
        p = pk.extract("targets/host.so")
        assert p == tmp_path / "cache" / "packed" / hashlib.sha256(data).hexdigest()[:16] / "host.so"
        assert p.read_bytes() == data
        first = p.stat()
        assert pk.extract("targets/host.so") == p
    with PackFile(tmp_path / "b.edgecl") as pk:  # a later session reuses it too
        assert pk.extract("targets/host.so") == p
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
        p.write_bytes(b"cut")  # wrong size: written again
        assert pk.extract("targets/host.so").read_bytes() == data
    assert [q.name for q in p.parent.iterdir()] == ["host.so"]


def test_is_pack(bundle, tmp_path):
    pack(bundle, tmp_path / "b.edgecl")
    assert is_pack(tmp_path / "b.edgecl")
    assert not is_pack(bundle) and not is_pack(bundle / "manifest.json") and not is_pack(tmp_path / "no")


# -- checks on open ----------------------------------------------------------------------
def _good() -> dict:
    return {"a.bin": {"offset": 128, "bytes": 10}, "b/c.bin": {"offset": 192, "bytes": 5}}


CORRUPT = {
    "bad magic": (dict(files=_good(), data=bytes(200), magic=b"GGUF\0\0\0\0"), "", "not a packed edgecl"),
    "unknown layout version": (dict(files=_good(), data=bytes(200), version=7), "",
                               "unknown packed layout version 7"),
    "bad alignment": (dict(files={}, alignment=100), "", "bad alignment"),
    "header length beyond the file": (dict(files=_good(), data=bytes(200), header_len=10**6), "",
                                      "header length 1000000 runs past the end"),
    "header not json": (dict(files={}, header_len=3), "", "header is not valid UTF-8 JSON"),
    "entry past the end": (dict(files={"a.bin": {"offset": 128, "bytes": 4096}}, data=bytes(100)),
                           ":a.bin", "run past the end of the file"),
    "overlapping entries": (dict(files={"a.bin": {"offset": 128, "bytes": 70},
                                        "b.bin": {"offset": 192, "bytes": 5}}, data=bytes(200)),
                            ":b.bin", "overlaps entry 'a.bin'"),
    "misaligned entry": (dict(files={"a.bin": {"offset": 130, "bytes": 1}}, data=bytes(200)),
                         ":a.bin", "not a multiple of the alignment 64"),
    "entry inside the header": (dict(files={"a.bin": {"offset": 0, "bytes": 1}}, data=bytes(200)),
                                ":a.bin", "inside the header"),
    "negative length": (dict(files={"a.bin": {"offset": 128, "bytes": -1}}, data=bytes(200)),
                        ":a.bin", "entry must be"),
    "dotdot": (dict(files={"../evil.bin": {"offset": 128, "bytes": 1}}, data=bytes(200)),
               ":../evil.bin", "'..'"),
    "absolute": (dict(files={"/etc/passwd": {"offset": 128, "bytes": 1}}, data=bytes(200)),
                 ":/etc/passwd", "absolute"),
    "file and dir": (dict(files={"a": {"offset": 128, "bytes": 1}, "a/b": {"offset": 192, "bytes": 1}},
                          data=bytes(200)), ":a", "both a file and a directory"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_files_are_refused_naming_the_file(tmp_path, case):
    kwargs, entry, reason = CORRUPT[case]
    path = _write_raw(tmp_path / "x.edgecl", **kwargs)
    with pytest.raises(BundleError) as e:
        PackFile(path)
    assert str(e.value).startswith(f"{path}{entry}: ")
    assert reason in str(e.value)


def test_truncated_pack_is_refused(bundle, tmp_path):
    out = tmp_path / "b.edgecl"
    pack(bundle, out)
    raw = out.read_bytes()
    for cut in (len(raw) - 1, 20):
        out.write_bytes(raw[:cut])
        with pytest.raises(BundleError, match="truncated|shorter") as e:
            PackFile(out)
        assert str(out) in str(e.value)
    with pytest.raises(BundleError, match="no such packed bundle file"):
        PackFile(tmp_path / "missing.edgecl")


# -- pack / unpack refusals ----------------------------------------------------------------
def test_pack_refusals(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        pack(bundle / "tasks", tmp_path / "t.edgecl")
    (bundle / "tasks" / "link.safetensors").symlink_to(bundle / "backbone-0123456789ab.safetensors")
    with pytest.raises(BundleError, match="is a symlink") as e:
        pack(bundle, tmp_path / "b.edgecl")
    assert "link.safetensors" in str(e.value)
    (bundle / "tasks" / "link.safetensors").unlink()
    pack(bundle, tmp_path / "b.edgecl")
    with pytest.raises(BundleError, match="already exists"):
        pack(bundle, tmp_path / "b.edgecl")
    before = (tmp_path / "b.edgecl").read_bytes()
    pack(bundle, tmp_path / "b.edgecl", alignment=64, overwrite=True)
    assert (tmp_path / "b.edgecl").read_bytes() != before
    with pytest.raises(BundleError, match="inside the bundle directory"):
        pack(bundle, bundle / "self.edgecl")
    with pytest.raises(ValueError, match="power of two"):
        pack(bundle, tmp_path / "c.edgecl", alignment=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.edgecl", "bundle"]  # no temp files


def test_unpack_refuses_a_different_directory(bundle, tmp_path):
    pack(bundle, tmp_path / "b.edgecl")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="is not empty and its manifest.json differs") as e:
        unpack(tmp_path / "b.edgecl", other)
    assert str(other) in str(e.value)
    assert (other / "manifest.json").read_text() == "{}"  # nothing touched
    # Identical files already there (a repeated unpack, or one cut short): fine.
    out = tmp_path / "out"
    unpack(tmp_path / "b.edgecl", out)
    (out / ".lock").write_text("mine")
    assert unpack(tmp_path / "b.edgecl", out)["written"] == 0
    (out / "manifest.json").unlink()
    assert unpack(tmp_path / "b.edgecl", out)["written"] == 1
    assert _files(out) == _files(bundle)


# -- command line ------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgecl")
    pack_cmd.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_pack_and_unpack(bundle, tmp_path, capsys):
    out = tmp_path / "b.edgecl"
    assert _cli(["pack", str(bundle), str(out), "--alignment", "256"]) == 0
    said = capsys.readouterr().out
    assert str(out) in said and "6 file(s)" in said and "padding" in said
    assert _header(out)[0][2] == 256
    with pytest.raises(BundleError, match="already exists"):
        _cli(["pack", str(bundle), str(out)])  # edgecl's main prints it and exits 2
    assert _cli(["pack", str(bundle), str(out), "--force"]) == 0
    assert _cli(["unpack", str(out), str(tmp_path / "u")]) == 0
    assert "wrote 6 of 6 file(s)" in capsys.readouterr().out
    assert _files(tmp_path / "u") == _files(bundle)
    assert _cli(["unpack", str(out), str(tmp_path / "u")]) == 0
    assert "nothing written" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _cli(["pack", str(bundle), str(out), "--alignment", "100"])
    assert "power of two" in capsys.readouterr().err
