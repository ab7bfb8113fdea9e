"""The bundle contract: hashes, refusals that name the file, atomic versioned writes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Bundle, BundleError, Runtime, bundle_write
from edgecl.runtime.bundle_format import serialize_manifest
from edgecl.runtime.safetensors_mmap import read_safetensors


def _files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != ".lock")


def test_layout_and_manifest(trained):
    bundle = trained("supsup")[1]
    b = Bundle.open(bundle)
    m = b.manifest
    assert m["format"] == "edgecl-bundle" and m["format_version"] == 2 and len(m["bundle_id"]) == 32
    # one version per task, each with the task-ID routers brought up to it
    assert b.versions() == [1, 2, 3, 4, 5] and b.version == 5
    assert [e["parts"] for e in m["log"]][1] == [
        "backbone:main", "task:digits-2-3", "router:entropy", "router:gradient", "router:prototype"]
    backbone = m["backbones"]["main"]["file"]
    assert backbone.startswith("backbone-") and backbone.endswith(".safetensors")
    assert [t["kind"] for t in b.tasks] == ["weight_bits"] * 5
    assert all(t["graph"] == "main" and t["backbone"] == "main" and t["depends"] == [] for t in b.tasks)
    listed = set(m["files"])
    routers = {r["file"] for r in m["routers"].values()}
    assert listed == {backbone, *(t["file"] for t in b.tasks), *routers}
    assert set(m["routers"]) == {"prototype", "entropy", "gradient"}
    for v in b.versions():  # every version routes among exactly its own tasks
        bv = Bundle.open(bundle, version=v)
        assert all(r["tasks"] == bv.task_names for r in bv.manifest["routers"].values())
    graph = m["graphs"]["main"]["graph"]
    assert graph["format"] == "edgecl-graph" and graph["features"] == "relu4"
    assert [n["op"] for n in graph["nodes"]] == ["Flatten", "Linear", "Relu", "Linear", "Relu"]
    assert graph["mask"] == ["fc1.weight", "fc2.weight"]
    # the backbone is a memory map, not a copy
    w = b.backbone["fc1.weight"]
    assert not w.flags.owndata and not w.flags.writeable


@pytest.mark.parametrize("method", ["supsup", "hat"])
def test_one_flipped_byte_in_any_file_is_refused_naming_the_file(bundle_copy, method):
    bundle = bundle_copy(method)
    for path in _files(bundle):
        original = path.read_bytes()
        for pos in {0, len(original) // 2, len(original) - 1}:
            damaged = bytearray(original)
            damaged[pos] ^= 0x01
            path.write_bytes(bytes(damaged))
            rel = path.relative_to(bundle).as_posix()
            version = None if rel == "manifest.json" else int(path.stem) if path.parent.name == "versions" \
                else max(v for v in range(1, 99) if (bundle / f"versions/{v:06d}.json").exists()
                         and rel in json.loads((bundle / f"versions/{v:06d}.json").read_text())["files"])
            with pytest.raises(BundleError) as e:
                Bundle.open(bundle, version=version)
            assert str(path) in str(e.value), (path, pos, e.value)
        path.write_bytes(original)
    Bundle.open(bundle)  # restored: loads again


def test_missing_file_is_refused_naming_it(bundle_copy):
    bundle = bundle_copy()
    b = Bundle.open(bundle)
    victim = bundle / b.tasks[2]["file"]
    victim.unlink()
    with pytest.raises(BundleError, match="missing") as e:
        Bundle.open(bundle)
    assert str(victim) in str(e.value)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest") as e:
        Bundle.open(bundle)
    assert "manifest.json" in str(e.value)


def test_unknown_format_version_is_refused(bundle_copy):
    bundle = bundle_copy()
    m = json.loads((bundle / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle / "manifest.json").write_bytes(serialize_manifest(m))  # a valid checksum
    with pytest.raises(BundleError, match="unknown format version 99") as e:
        Bundle.open(bundle)
    assert "manifest.json" in str(e.value)


def test_truncated_safetensors_is_refused(bundle_copy, tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00")
    with pytest.raises(BundleError, match="not a safetensors") as e:
        read_safetensors(p)
    assert str(p) in str(e.value)


def _commit_next(bundle: Path) -> None:
    """Add one more (copied) task to the bundle as a new version."""
    b = Bundle.open(bundle)
    t = b.tasks[0]
    entry = {k: t[k] for k in ("classes", "n_classes", "method", "kind", "metrics")}
    entry["name"] = f"extra-{b.version}"
    bundle_write.commit(bundle, model=b.model, backbone=dict(b.backbone),
                         tasks=[(entry, b.task_tensors(0))])


def test_a_crash_at_any_write_leaves_the_previous_version_loadable(bundle_copy, monkeypatch):
    import shutil

    pristine = bundle_copy()
    before = Bundle.open(pristine).version
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    want = Runtime(pristine).logits(x, 1).tobytes()
    real_replace = os.replace
    crash_at, calls = 0, 0

    def crashing(src, dst):
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing)
    while True:  # crash at the 1st rename, then the 2nd, ... until a commit gets through
        crash_at += 1
        calls = 0
        bundle = pristine.parent / f"crash-{crash_at}"
        shutil.copytree(pristine, bundle)
        try:
            _commit_next(bundle)
        except KeyboardInterrupt:
            b = Bundle.open(bundle)
            assert b.version == before
            assert Runtime(bundle).logits(x, 1).tobytes() == want
            assert not list(bundle.rglob("*.tmp"))
            _commit_next(bundle)  # and the next commit still works
            assert Bundle.open(bundle).version == before + 1
            continue
        break
    assert crash_at >= 3  # task file, version file, manifest were each cut once
    assert Bundle.open(bundle).version == before + 1


def test_a_full_disk_fails_clearly_and_keeps_the_bundle(bundle_copy, monkeypatch):
    bundle = bundle_copy()
    before = Bundle.open(bundle).version
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        _commit_next(bundle)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert Bundle.open(bundle).version == before
    assert not list(bundle.rglob("*.tmp"))


def test_adding_a_task_keeps_the_backbone_file(bundle_copy):
    bundle = bundle_copy("supsup")
    b = Bundle.open(bundle)
    backbone = bundle / b.backbone_file()
    stat = backbone.stat()
    _commit_next(bundle)
    b2 = Bundle.open(bundle)
    assert b2.backbone_file() == b.backbone_file()
    assert backbone.stat().st_ino == stat.st_ino and backbone.stat().st_mtime_ns == stat.st_mtime_ns
    assert b2.task_names[:-1] == b.task_names


def test_duplicate_task_name_and_other_model_refused(bundle_copy):
    bundle = bundle_copy()
    b = Bundle.open(bundle)
    entry = dict(b.tasks[0])
    with pytest.raises(BundleError, match="already in the bundle"):
        bundle_write.commit(bundle, model=b.model, backbone=dict(b.backbone),
                             tasks=[(entry, b.task_tensors(0))])
    other = dict(b.model, feature_dim=1)
    with pytest.raises(BundleError, match="another model"):
        bundle_write.commit(bundle, model=other, backbone=dict(b.backbone), tasks=[])
    assert Bundle.open(bundle).version == b.version
