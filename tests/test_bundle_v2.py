"""Bundle format 2: signatures and the trust store, replay and rollback, supersede and the
version log, gc, format-1 bundles, the one-file form, and SIGKILL during a commit of a task
together with its router update."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Bundle, BundleError, Runtime
from edgecl.runtime.bundle_format import serialize_manifest
from edgecl.runtime.bundle_write import Transaction, gc, migrate, rollback, safetensors_bytes
from edgecl.runtime.graph import Graph, Node, Param, Value, model_entry
from edgecl.runtime.kinds import get_kind
from edgecl.runtime.packfile import pack
from edgecl.runtime.routers.store import load_router, refit, set_routers
from edgecl.runtime.signing import (
    BadSignatureError,
    ReplayError,
    SigningKey,
    TrustStore,
    UnknownKeyError,
    UnsignedError,
    generate_key,
)
from edgecl.tools.cli import main as cli

RNG = np.random.default_rng(3)


def _graph() -> Graph:
    params = [Param("fc1.weight", (32, 16), "weight"), Param("fc1.bias", (32,), "bias"),
              Param("fc2.weight", (24, 32), "weight"), Param("fc2.bias", (24,), "bias")]
    nodes = [Node("fc1", "Linear", ("x", "fc1.weight", "fc1.bias"), ("h1",)),
             Node("relu1", "Relu", ("h1",), ("r1",)),
             Node("fc2", "Linear", ("r1", "fc2.weight", "fc2.bias"), ("h2",)),
             Node("relu2", "Relu", ("h2",), ("r2",))]
    return Graph([Value("x", (16,))], params, nodes, "r2", name="mlp")


def _backbone(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {p.name: r.standard_normal(p.shape).astype(np.float32) * 0.3 for p in g.params.values()}


def _task(g: Graph, name: str, seed: int) -> tuple[dict, dict]:
    r = np.random.default_rng(seed)
    parts = {f"mask.{s.node}": r.random(s.shape) < 0.5 for s in g.mask_sites()}
    parts |= {"head.weight": r.standard_normal((2, 24)).astype(np.float32),
              "head.bias": r.standard_normal(2).astype(np.float32)}
    entry = {"name": name, "kind": "weight_bits", "classes": [2 * seed, 2 * seed + 1], "n_classes": 2,
             "method": "test", "metrics": {}}
    return entry, get_kind("weight_bits").encode(parts, g)


def _data(name: str, seed: int) -> tuple[str, np.ndarray, np.ndarray]:
    r = np.random.default_rng(100 + seed)
    return name, (r.random((20, 16)) + seed).astype(np.float32), r.integers(0, 2, 20)


def make_bundle(root: Path, n_tasks: int = 2, key=None, routers: bool = True) -> Path:
    g = _graph()
    for i in range(n_tasks):
        with Transaction(root, key=key) as tx:
            tx.add_graph("main", model_entry(g, "mlp"))
            if tx.is_new:
                tx.add_backbone("main", _backbone(g))
            tx.add_task(*_task(g, f"t{i}", i))
            if routers:
                set_routers(tx, refit(tx.candidate(), [_data(f"t{j}", j) for j in range(i + 1)],
                                      names=["prototype"]))
    return root


@pytest.fixture()
def keys(tmp_path):
    trust = tmp_path / "trust"
    trust.mkdir()
    host = generate_key(tmp_path / "host.key", name="build-server")
    shutil.copy(tmp_path / "host.pub", trust / "host.pub")
    device = generate_key(tmp_path / "device.key", name="pi-7")
    shutil.copy(tmp_path / "device.pub", trust / "device.pub")
    generate_key(tmp_path / "mallory.key")
    return {"trust": TrustStore(trust), "trust_dir": trust, "host": SigningKey.load(tmp_path / "host.key"),
            "device": SigningKey.load(tmp_path / "device.key"),
            "mallory": SigningKey.load(tmp_path / "mallory.key"), "ids": (host, device)}


def _logits(b: Bundle | Path, x: np.ndarray) -> dict[str, bytes]:
    rt = Runtime(b)
    return {t: rt.logits(x, t).tobytes() for t in rt.tasks}


# -- signatures ------------------------------------------------------------------------------
def test_a_signed_bundle_opens_with_the_trust_store_and_names_its_signer(tmp_path, keys):
    root = make_bundle(tmp_path / "b", key=keys["host"])
    b = Bundle.open(root, trust=keys["trust"])
    assert b.signer == keys["host"].key_id
    assert b.manifest["log"][-1]["signer"] == keys["host"].key_id
    assert all(t["origin"]["key"] == keys["host"].key_id for t in b.tasks)


def _swap_mask(root: Path) -> None:
    """What an attacker who can write the bundle does: replace a task's mask, recompute
    its sha256 and the manifest's checksum (the signature it cannot recompute)."""
    b = Bundle.open(root, trust=None)
    info = b.tasks[0]
    tensors = dict(b.task_tensors(info["name"]))
    tensors["mask.fc1"] = np.full_like(tensors["mask.fc1"], 0xFF)
    data = safetensors_bytes(tensors, {"edgecl": "task"})
    (root / info["file"]).write_bytes(data)
    m = dict(b.manifest)
    import hashlib

    m["files"] = dict(m["files"], **{info["file"]: {"sha256": hashlib.sha256(data).hexdigest(),
                                                    "bytes": len(data)}})
    (root / "manifest.json").write_bytes(serialize_manifest(m))


def test_a_swapped_mask_with_recomputed_hashes_is_refused_with_a_trust_store(tmp_path, keys):
    root = make_bundle(tmp_path / "b", key=keys["host"])
    _swap_mask(root)
    Bundle.open(root, trust=None)  # sha256 alone is fooled: every hash matches
    with pytest.raises(BadSignatureError) as e:
        Bundle.open(root, trust=keys["trust"])
    assert str(root / "manifest.json") in str(e.value) and "does not verify" in str(e.value)


def test_unsigned_and_wrong_key_bundles_are_refused(tmp_path, keys):
    unsigned = make_bundle(tmp_path / "u", key=None, routers=False)
    with pytest.raises(UnsignedError, match="unsigned") as e:
        Bundle.open(unsigned, trust=keys["trust"])
    assert str(unsigned / "manifest.json") in str(e.value)
    wrong = make_bundle(tmp_path / "w", key=keys["mallory"], routers=False)
    with pytest.raises(UnknownKeyError, match=keys["mallory"].key_id):
        Bundle.open(wrong, trust=keys["trust"])
    # the attacker re-signs a swapped mask with their own key: still refused
    signed = make_bundle(tmp_path / "s", key=keys["host"], routers=False)
    _swap_mask(signed)
    m = json.loads((signed / "manifest.json").read_text())
    from edgecl.runtime.bundle_format import signed_body
    from edgecl.runtime.signing import sign_manifest

    m["signature"] = sign_manifest(keys["mallory"], signed_body(m))
    (signed / "manifest.json").write_bytes(serialize_manifest(m))
    with pytest.raises(UnknownKeyError):
        Bundle.open(signed, trust=keys["trust"])


def test_a_replayed_older_manifest_is_refused_unless_rollback_is_asked(tmp_path, keys):
    root = make_bundle(tmp_path / "b", n_tasks=3, key=keys["host"], routers=False)
    assert Bundle.open(root, trust=keys["trust"]).version == 3
    old = (root / "versions/000002.json").read_bytes()
    (root / "manifest.json").write_bytes(old)  # a validly signed, older manifest
    with pytest.raises(ReplayError) as e:
        Bundle.open(root, trust=keys["trust"])
    assert "3" in str(e.value) and "2" in str(e.value) and str(root / "manifest.json") in str(e.value)
    assert Bundle.open(root, trust=keys["trust"], allow_rollback=True).version == 2
    # an explicit rollback is a new, higher version: accepted without any flag
    (root / "manifest.json").write_bytes((root / "versions/000003.json").read_bytes())
    v = rollback(root, 1, key=keys["host"])
    b = Bundle.open(root, trust=keys["trust"])
    assert v == b.version == 4 and b.task_names == ["t0"]
    assert b.manifest["log"][-1]["parts"] == ["rollback:1"]
    x = RNG.random((4, 16), dtype=np.float32)
    assert _logits(b, x) == _logits(Bundle.open(root, version=1), x)


def test_a_device_signs_the_task_it_learns_and_the_host_sees_which_device(tmp_path, keys, capsys):
    root = make_bundle(tmp_path / "b", key=keys["host"], routers=False)
    g = _graph()
    with Transaction(root, key=keys["device"]) as tx:
        tx.add_task(*_task(g, "learned-on-pi", 9))
    b = Bundle.open(root, trust=keys["trust"])
    assert b.signer == keys["device"].key_id
    assert cli(["verify", str(root), "--trust-store", str(keys["trust_dir"])]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.strip().startswith(("0", "1", "2"))}
    assert keys["host"].key_id in rows["t0"] and keys["device"].key_id in rows["learned-on-pi"]


# -- supersede, log, gc -------------------------------------------------------------------------
def test_supersede_is_a_new_revision_recorded_in_the_log(tmp_path):
    root = make_bundle(tmp_path / "b", routers=False)
    g = _graph()
    entry, tensors = _task(g, "t0", 42)
    with pytest.raises(BundleError, match="already in the bundle"), Transaction(root, key=None) as tx:
        tx.add_task(entry, tensors)
    with Transaction(root, key=None) as tx:
        tx.add_task(entry, tensors, supersede=True)
    b = Bundle.open(root)
    t0 = b.task("t0")
    assert t0["revision"] == 2 and t0["index"] == 0 and b.task_names == ["t0", "t1"]
    sup = b.log[-1]["superseded"]
    assert sup == [{"task": "t0", "revision": 1, "file": Bundle.open(root, version=2).task("t0")["file"],
                    "by_revision": 2, "by_file": t0["file"]}]
    assert Bundle.open(root, version=2).task("t0")["revision"] == 1  # the old version is intact


def test_gc_keeps_retained_versions_identical_and_frees_replaced_backbones(tmp_path, capsys):
    root = make_bundle(tmp_path / "b", n_tasks=2, routers=False)
    g = _graph()
    x = RNG.random((6, 16), dtype=np.float32)
    for seed in (1, 2):  # two more versions, each with a new backbone (free weights changed)
        with Transaction(root, key=None) as tx:
            tx.add_backbone("main", _backbone(g, seed))
    old_backbone = Bundle.open(root, version=1).backbone_file()
    before = {v: _logits(Bundle.open(root, version=v), x) for v in (3, 4)}
    (root / ".tasks-crash.tmp").write_bytes(b"x" * 10)  # a crashed writer's leftover
    assert cli(["gc", str(root), "--keep", "2"]) == 0
    out = capsys.readouterr().out
    b = Bundle.open(root)
    assert b.versions() == [3, 4]
    for v in (3, 4):
        assert _logits(Bundle.open(root, version=v), x) == before[v]
    assert not (root / old_backbone).exists() and not (root / ".tasks-crash.tmp").exists()
    freed = int(out.split("freed ")[1].split(" bytes")[0].replace(",", ""))
    assert freed >= Bundle.open(root).manifest["files"][b.backbone_file()]["bytes"]
    assert f"removed {old_backbone}" in out
    r = gc(root, keep=2)  # nothing left to free
    assert r["freed_bytes"] == 0 and r["removed_versions"] == []


def test_an_interrupted_gc_is_finished_by_the_next(tmp_path):
    root = make_bundle(tmp_path / "b", n_tasks=3, routers=False)
    doomed = "versions/000001.json"
    (root / ".gc-pending.json").write_text(json.dumps({"delete": [doomed]}))
    r = gc(root, keep=5)
    assert 1 in r["removed_versions"] and not (root / doomed).exists()
    assert not (root / ".gc-pending.json").exists()
    Bundle.open(root, version=2)


# -- format 1 ---------------------------------------------------------------------------------
def _as_format_1(src: Path, dst: Path) -> Path:
    """The bundle as format 1 wrote it: one model, one backbone, ``mask_kind``."""
    shutil.copytree(src, dst)
    b = Bundle.open(dst)
    m = {"format": "edgecl-bundle", "format_version": 1, "version": 1, "model": b.model,
         "backbone": b.backbone_file(), "files": b.manifest["files"],
         "tasks": [{k: v for k, v in t.items() if k not in ("kind", "graph", "backbone", "depends",
                                                           "revision", "origin")} | {"mask_kind": t["kind"]}
                   for t in b.tasks]}
    shutil.rmtree(dst / "versions")
    (dst / "versions").mkdir()
    raw = serialize_manifest(m)
    (dst / "manifest.json").write_bytes(raw)
    (dst / "versions/000001.json").write_bytes(raw)
    return dst


def test_a_format_1_bundle_opens_and_migrates_with_one_command(tmp_path, keys):
    v2 = make_bundle(tmp_path / "v2", routers=False)
    v1 = _as_format_1(v2, tmp_path / "v1")
    x = RNG.random((5, 16), dtype=np.float32)
    b = Bundle.open(v1)
    assert b.manifest["upgraded_from"] == 1 and [t["kind"] for t in b.tasks] == ["weight_bits"] * 2
    assert _logits(b, x) == _logits(v2, x)
    with pytest.raises(UnsignedError, match="edgecl sign"):
        Bundle.open(v1, trust=keys["trust"])
    assert cli(["migrate", str(v1), "--key", str(tmp_path / "host.key")]) == 0
    b = Bundle.open(v1, trust=keys["trust"])
    assert b.version == 2 and b.manifest["format_version"] == 2 and len(b.bundle_id) == 32
    assert _logits(b, x) == _logits(v2, x)
    assert Bundle.open(v1, version=1).manifest["upgraded_from"] == 1  # the old version as written


# -- the one-file form ----------------------------------------------------------------------------
def test_the_packed_bundle_gives_byte_identical_logits_and_routes(tmp_path):
    root = make_bundle(tmp_path / "b", n_tasks=3)
    out = tmp_path / "b.edgecl"
    pack(root, out)
    x = RNG.random((7, 16), dtype=np.float32)
    packed = Bundle.open(out)
    assert _logits(packed, x) == _logits(root, x)
    assert packed.versions() == Bundle.open(root).versions()
    assert load_router(packed).tasks == ["t0", "t1", "t2"]
    from edgecl.runtime import Session

    s = Session(out, providers=["numpy"])
    assert s.logits(x, "t1").tobytes() == Runtime(root).logits(x, "t1").tobytes()
    assert [r for r in s.run(x).task_names] and not s.reload()
    assert not packed.backbone["fc1.weight"].flags.writeable
    with pytest.raises(BundleError, match="read-only"), Transaction(out, key=None):
        pass
    assert cli(["unpack", str(out), str(tmp_path / "again")]) == 0
    assert _logits(tmp_path / "again", x) == _logits(root, x)


# -- SIGKILL during a commit of a task and its router update --------------------------------------
_COMMITTER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_bundle_v2 import _data, _graph, _task
from edgecl.runtime.bundle_write import Transaction
from edgecl.runtime.routers.store import refit, set_routers
root, start = Path(sys.argv[1]), int(sys.argv[3])
g = _graph()
print("ready", flush=True)
for i in range(start, start + 1000):
    with Transaction(root, key=None) as tx:
        tx.add_task(*_task(g, f"t{i}", i))
        set_routers(tx, refit(tx.candidate(), [_data(f"t{i}", i)], names=["prototype"]))
"""


def test_sigkill_at_random_instants_during_task_plus_router_commits(tmp_path):
    root = make_bundle(tmp_path / "b", n_tasks=2)
    x = RNG.random((8, 16), dtype=np.float32)
    rng = np.random.default_rng(11)
    seen_versions = {Bundle.open(root).version}
    kills = 0
    for _ in range(55):
        before = Bundle.open(root)
        proc = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(root), str(Path(__file__).parent),
                                 str(len(before.tasks))], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        assert proc.stdout.readline().strip() == "ready"
        # a commit takes a few ms to tens of ms: kill somewhere within the first few
        import time

        time.sleep(float(rng.uniform(0.0, 0.08)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        after = Bundle.open(root)  # verified: every file of the version whole
        assert after.version >= before.version
        seen_versions.add(after.version)
        # never a mix: the version's routers cover exactly its tasks, and routing works
        router = load_router(after)
        assert router.tasks == after.task_names
        rt = Runtime(after)
        router.decide(rt, x, threshold=0.0)
        for t in before.task_names:  # committed tasks never change
            assert rt.logits(x, t).tobytes() == Runtime(before).logits(x, t).tobytes()
    assert kills >= 50
    assert len(seen_versions) > 5  # kills landed both before and after commits completed
    with Transaction(root, key=None):  # the writer's lock and temp files: no obstacle
        pass
    assert gc(root, keep=1)["kept_versions"] == [Bundle.open(root).version]


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o007)
    try:
        root = make_bundle(tmp_path / "b", n_tasks=1, routers=False)
    finally:
        os.umask(old)
    for p in root.rglob("*"):
        if p.is_file() and p.name != ".lock":
            assert p.stat().st_mode & 0o777 == 0o660, p


def test_rollback_cli_and_log(tmp_path, capsys):
    root = make_bundle(tmp_path / "b", n_tasks=2, routers=False)
    assert cli(["rollback", str(root), "--to", "1"]) == 0
    assert cli(["log", str(root)]) == 0
    out = capsys.readouterr().out
    assert "version 3 restores version 1" in out and "rollback:1" in out and "task:t1" in out


def test_commit_to_a_missing_version_for_rollback_is_refused(tmp_path):
    root = make_bundle(tmp_path / "b", n_tasks=1, routers=False)
    with pytest.raises(BundleError, match="version 7"):
        rollback(root, 7)
    assert Bundle.open(root).version == 1


def test_migrate_of_a_new_bundle_and_sign_without_key_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGECL_SIGNING_KEY", raising=False)
    root = make_bundle(tmp_path / "b", n_tasks=1, routers=False)
    assert cli(["sign", str(root)]) == 2
    assert "needs --key" in capsys.readouterr().err
    assert Bundle.open(root).version == 1
    with pytest.raises(BundleError, match="no bundle here"):
        migrate(tmp_path / "empty")




def test_the_trust_store_from_the_environment_with_a_separate_version_record(tmp_path, keys, monkeypatch,
                                                                            capsys):
    root = make_bundle(tmp_path / "b", key=keys["host"], routers=False)
    state = tmp_path / "state" / "seen.json"
    state.parent.mkdir()
    monkeypatch.setenv("EDGECL_TRUST_STORE", str(keys["trust_dir"]))
    monkeypatch.setenv("EDGECL_TRUST_STATE", str(state))
    assert Bundle.open(root).signer == keys["host"].key_id  # the default: the environment's store
    assert json.loads(state.read_text()) == {Bundle.open(root, trust=None).bundle_id: 2}
    assert not (keys["trust_dir"] / "seen-versions.json").exists()
    unsigned = make_bundle(tmp_path / "u", n_tasks=1, routers=False)
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    assert cli(["infer", str(unsigned), "--task", "0", "--input", str(tmp_path / "x.npy")]) == 2
    assert "unsigned" in capsys.readouterr().err


def test_a_commit_that_fails_late_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    """The disk fills at the very last write (the manifest swap): the task, router and
    version files this commit had already written are removed again."""
    import errno

    from edgecl.runtime import bundle_write

    root = make_bundle(tmp_path / "b", n_tasks=2)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    real = bundle_write.atomic_write_bytes

    def full_at_manifest(path, data):
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(bundle_write, "atomic_write_bytes", full_at_manifest)
    g = _graph()
    with pytest.raises(OSError, match="No space left"), Transaction(root, key=None) as tx:
        tx.add_task(*_task(g, "t2", 2))
        set_routers(tx, refit(tx.candidate(), [_data("t2", 2)], names=["prototype"]))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == files
    assert Bundle.open(root).version == 2
    monkeypatch.setattr(bundle_write, "atomic_write_bytes", real)
    with Transaction(root, key=None) as tx:
        tx.add_task(*_task(g, "t2", 2))
    assert Bundle.open(root).task_names == ["t0", "t1", "t2"] and Bundle.open(root).versions() == [1, 2, 3]
