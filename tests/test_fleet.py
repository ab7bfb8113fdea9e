"""Fleets (docs/fleet.md): the protocol without Flower (aggregation, refused uploads, what a
device adds, the wire encoding), then end to end on a real Flower SuperLink and three
SuperNodes on loopback, separate processes, each device with its own bundle and its own share
of Split-Digits; and one fleet whose third device is the emulated Pi (needs root).

The end-to-end tests need Flower (the ``fleet`` extra, flwr==1.42.0) next to this Python
or in ``$EDGECL_FLEET_BIN``; without it they are skipped, saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import Transaction
from edgecl.runtime.fleet import FleetError, FleetStore, aggregate, apply_parts, offer
from edgecl.runtime.fleet.sync import make_part
from edgecl.runtime.signing import SigningKey, TrustStore, generate_key, sign_part
from edgecl.tools.bench_fleet import Deployment, free_port, logits_bytes, make_fleet, task_il_acc

SHARES = [["digits-2-3", "digits-4-5"], ["digits-6-7"], ["digits-8-9"]]


def _flower_available() -> bool:
    from edgecl.runtime.fleet import launch

    try:
        launch.flower_bin("flower-superlink")
        return True
    except FleetError:
        return False


needs_flower = pytest.mark.skipif(not _flower_available(),
                                  reason="Flower (flwr==1.42.0) is not installed: pip install "
                                         "'edgecl[fleet]' or set EDGECL_FLEET_BIN (docs/fleet.md)")


@pytest.fixture
def fleet(trained, tmp_path):
    return make_fleet(trained("supsup")[1], tmp_path / "fleet", SHARES)


def _x(digits) -> np.ndarray:
    return np.concatenate([t.x_test.reshape(len(t.x_test), -1) for t in digits.tasks]).astype(np.float32)


def _verifier(fleet, bundle: Path) -> TrustStore:
    """The fleet's keys, with a version record of this bundle's own (the devices' bundles and
    the fleet's are copies of one bundle: they share its bundle_id, not its versions)."""
    return TrustStore(fleet.trust[0], fleet.root / f"seen-{Path(bundle).name}.json")


def _task_files_never_change(bundle: Path) -> None:
    """Across every version of the bundle, a task's file, once there, stays the same bytes."""
    seen: dict[str, str] = {}
    for v in Bundle.open(bundle).versions():
        b = Bundle.open(bundle, version=v, trust=None)
        for t in b.tasks:
            sha = b.file_sha256(t["file"])
            assert seen.setdefault(t["name"], sha) == sha, f"{bundle}: {t['name']} changed at version {v}"


# -- the protocol, without Flower --------------------------------------------------------------
def test_aggregation_is_a_weighted_majority_of_mask_bits_and_a_weighted_mean_of_heads():
    bits = [np.array([0b1111_0000, 0b0000_0001], np.uint8), np.array([0b1100_1100, 0b0000_0011], np.uint8),
            np.array([0b0000_1111, 0b0000_0010], np.uint8)]
    heads = [np.full((2, 3), v, np.float32) for v in (1.0, 2.0, 4.0)]
    parts = [{"mask.fc1": b, "head.weight": h, "head.bias": h[:, 0].copy()}
             for b, h in zip(bits, heads, strict=True)]
    out = aggregate(parts, [1, 1, 1])
    # bit by bit: at least 2 of 3 votes (LSB first)
    votes = np.stack([np.unpackbits(b, bitorder="little") for b in bits]).sum(0)
    want = np.packbits((votes >= 2).astype(np.uint8), bitorder="little")
    assert out["mask.fc1"].tobytes() == want.tobytes()
    assert np.allclose(out["head.weight"], 7 / 3) and out["head.weight"].dtype == np.float32
    # the weights are the devices' sample counts: one device with most of the samples wins the vote
    out = aggregate(parts, [10, 1, 1])
    assert out["mask.fc1"].tobytes() == bits[0].tobytes()
    assert np.allclose(out["head.weight"], (10 + 2 + 4) / 12)
    with pytest.raises(FleetError, match="different tensors"):
        aggregate([parts[0], {"head.weight": heads[1]}], [1, 1])


def test_server_refuses_tampered_unsigned_and_unknown_key_uploads_and_logs_them(fleet, tmp_path):
    dev = Bundle.open(fleet.devices[1])
    key = SigningKey.load(fleet.keys[1])
    store = FleetStore(fleet.fleet, key=SigningKey.load(fleet.server_key),
                       trust=TrustStore(fleet.device_keys), state_dir=tmp_path / "state")
    good = offer(dev, key.key_id, store.have())
    assert [p["name"] for p in good] == ["digits-6-7"]
    tampered = dict(good[0], data=bytearray(good[0]["data"]))
    tampered["data"][-5] ^= 1
    tampered["data"], tampered["sha256"] = bytes(tampered["data"]), None  # no claimed hash to give it away
    unsigned = dict(good[0], origin=None)
    generate_key(tmp_path / "rogue.key")
    rogue = SigningKey.load(tmp_path / "rogue.key")
    forged = dict(good[0], origin=sign_part(rogue, "digits-6-7", good[0]["sha256"]))
    wrong_name = dict(good[0], name="digits-6-7-bis")  # the signature covers the name too
    ok, bad = store.accept([tampered, unsigned, forged, wrong_name, good[0]], node="7")
    assert ok == ["digits-6-7"]
    reasons = [r["reason"] for r in bad]
    assert "modified after signing" in reasons[0] and "no signature" in reasons[1]
    assert "does not hold" in reasons[2] and "modified after signing" in reasons[3]
    logged = [json.loads(x) for x in (tmp_path / "state/rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in logged] == reasons and all(r["node"] == "7" for r in logged)
    before = Bundle.open(fleet.fleet).version
    res = store.consolidate(note="test")
    after = Bundle.open(fleet.fleet, trust=_verifier(fleet, fleet.fleet))  # signed by the server
    assert res["added"] == ["digits-6-7"] and after.version == before + 1
    assert after.task("digits-6-7")["origin"]["key"] == key.key_id  # who learned it, kept
    assert store.consolidate(note="again")["version"] == after.version  # nothing new: no version


def test_a_task_learned_on_another_backbone_is_refused(fleet, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fleet.devices[2], other)
    b = Bundle.open(other)
    with Transaction(other, key=SigningKey.load(fleet.keys[2])) as tx:
        tx.add_backbone(b.main, {k: np.array(v) * np.float32(1.5) for k, v in b.backbone.items()})
    store = FleetStore(fleet.fleet, key=SigningKey.load(fleet.server_key),
                       trust=TrustStore(fleet.device_keys), state_dir=tmp_path / "state")
    ok, bad = store.accept([make_part(Bundle.open(other), "digits-8-9")], node="3")
    assert not ok and "another graph or backbone" in bad[0]["reason"]


def test_several_devices_learning_one_task_make_one_aggregated_revision(fleet, tmp_path):
    """Devices 0 and 1 both learned digits-2-3 (device 1 a version with a flipped head):
    the fleet holds their aggregate, signed by the server; a device that learned it
    itself keeps its own."""
    src = Bundle.open(fleet.devices[0])
    t = src.task("digits-2-3")
    tensors = src.task_tensors("digits-2-3")
    tensors["head.weight"] = -tensors["head.weight"]
    entry = {k: v for k, v in t.items() if k in ("kind", "classes", "n_classes", "method", "metrics")}
    with Transaction(fleet.devices[1], key=SigningKey.load(fleet.keys[1])) as tx:
        tx.add_task(dict(entry, name="digits-2-3"), tensors)
    server = SigningKey.load(fleet.server_key)
    store = FleetStore(fleet.fleet, key=server, trust=TrustStore(fleet.device_keys), state_dir=tmp_path / "s")
    for i in (0, 1):
        k = SigningKey.load(fleet.keys[i])
        store.accept(offer(Bundle.open(fleet.devices[i]), k.key_id, store.have()), node=str(i))
    store.consolidate(note="round")
    fb = Bundle.open(fleet.fleet)
    agg = fb.task("digits-2-3")
    assert agg["origin"]["key"] == server.key_id and agg["fleet"]["contributors"] == sorted(
        [SigningKey.load(fleet.keys[0]).key_id, SigningKey.load(fleet.keys[1]).key_id])
    assert np.allclose(fb.task_tensors("digits-2-3")["head.weight"], 0.0)  # the mean of w and -w
    # the devices that learned it keep theirs; device 2 lacks it and gets the aggregate
    assert "digits-2-3" not in [p["name"] for p in store.missing_for({"digits-2-3": "x"})]
    assert "digits-2-3" in [p["name"] for p in store.missing_for({})]


def test_a_device_adds_what_it_lacks_and_refuses_an_unsigned_download(fleet, digits):
    dev, names = fleet.devices[2], ["digits-0-1", "digits-8-9"]
    x = _x(digits)
    before = logits_bytes(dev, names, x)
    src = Bundle.open(fleet.devices[0])
    parts = [make_part(src, "digits-2-3"), make_part(src, "digits-4-5")]
    unsigned = dict(parts[1], origin=None)
    v0 = Bundle.open(dev).version
    with pytest.raises(FleetError, match="no signature"):
        apply_parts(dev, [parts[0], unsigned], key=SigningKey.load(fleet.keys[2]),
                    trust=TrustStore(fleet.trust[2]), note="t")
    assert Bundle.open(dev).version == v0  # all or nothing
    res = apply_parts(dev, parts, key=SigningKey.load(fleet.keys[2]), trust=TrustStore(fleet.trust[2]),
                      note="t")
    assert res["added"] == ["digits-2-3", "digits-4-5"] and res["version"] == v0 + 1
    b = Bundle.open(dev)
    assert b.task("digits-2-3")["origin"] == src.task("digits-2-3")["origin"]  # device 0 learned it
    assert logits_bytes(dev, names, x) == before
    acc = task_il_acc(dev, [t for t in digits.tasks if t.name in b.task_names])
    assert min(acc.values()) >= 0.97, acc


def test_parts_travel_compressed_and_are_checked_on_their_original_bytes(fleet, tmp_path):
    """One zlib stream per message; what arrives is the task files' very bytes, and a
    payload that is not one (corrupt, truncated, too big inflated) is refused, named."""
    import zlib

    from edgecl.runtime.fleet.sync import decode_have, decode_parts, encode_have, encode_parts

    src = Bundle.open(fleet.devices[0])
    parts = [make_part(src, "digits-2-3"), make_part(src, "digits-4-5")]
    payload = encode_parts(parts, inventory={"a": "b"})
    doc, back = decode_parts(payload, "test")
    assert doc["inventory"] == {"a": "b"}
    assert [p["data"] for p in back] == [p["data"] for p in parts]
    assert back == parts
    plain = len(json.dumps([{k: v for k, v in p.items() if k != "data"} for p in parts]))
    assert len(payload) < plain + sum(len(p["data"]) for p in parts)  # smaller than sent as they are
    with pytest.raises(FleetError, match="not a zlib stream"):
        decode_parts(b"\0" + payload[1:], "node 5")
    with pytest.raises(FleetError, match="node 5: the payload is truncated"):
        decode_parts(payload[:-20], "node 5")
    with pytest.raises(FleetError, match="inflates to more than"):
        from edgecl.runtime.fleet.sync import unpack

        unpack(zlib.compress(b"\0" * 10_000), "node 5", limit=1000)
    with pytest.raises(FleetError, match="sizes do not match"):
        decode_parts(zlib.compress(b'{"parts":[],"sizes":[3]}\nab'), "node 5")
    # a file changed in transit (inside a valid stream) is still refused by its hash and signature
    bad = dict(parts[1], data=parts[1]["data"][:-1] + bytes([parts[1]["data"][-1] ^ 1]))
    _, (got,) = decode_parts(encode_parts([bad]), "node 1")
    store = FleetStore(fleet.fleet, key=SigningKey.load(fleet.server_key),
                       trust=TrustStore(fleet.device_keys), state_dir=tmp_path / "state")
    ok, rej = store.accept([got], node="1")
    assert not ok and "does not hash to the sha256 it claims" in rej[0]["reason"]
    shas = {p["sha256"] for p in parts}
    assert decode_have(encode_have(shas), "x") == shas and len(encode_have(shas)) == 64
    with pytest.raises(FleetError, match="32-byte"):
        decode_have(b"\0" * 33, "the server")


def test_deploy_fleet_adds_flower_to_the_device_wheelhouse(tmp_path):
    from edgecl.tools import deploy as dep

    reqs, _ = dep.requirements(["numpy"], fleet=True)
    assert any(dep._name(r) == "flwr" for r in reqs)
    assert not any(dep._name(r) == "flwr" for r in dep.requirements(["numpy"])[0])
    names = dep.install_names(["numpy"], tmp_path, fleet=True)
    assert [n for n in names if dep._name(n) == "flwr"] == [n for n in reqs if dep._name(n) == "flwr"]
    assert "flwr" not in " ".join(dep.install_names(["numpy"], tmp_path))


def _kill_when(log: Path, text: str, kill) -> None:
    """``kill()`` a second after ``text`` shows in ``log`` (the round is under way)."""
    deadline = time.monotonic() + 120
    while text not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    kill()


# -- end to end: a SuperLink and three SuperNodes, separate processes --------------------------------
@pytest.mark.slow
@needs_flower
def test_three_devices_on_flower_end_up_serving_every_task(fleet, digits):
    x = _x(digits)
    own = {d: Bundle.open(d).task_names for d in fleet.devices}
    before = {d: logits_bytes(d, own[d], x) for d in fleet.devices}
    # as a user runs it: `edgecl fleet join` on each device, `edgecl fleet server` on the server
    port = free_port()
    cli = [sys.executable, "-m", "edgecl.tools.cli"]
    joins = [subprocess.Popen([*cli, "fleet", "join", str(d), "--server", f"127.0.0.1:{port}",
                               "--key", str(fleet.keys[i]), "--trust-store", str(fleet.trust[i]),
                               "--port", str(free_port())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
             for i, d in enumerate(fleet.devices)]
    try:
        r = subprocess.run([*cli, "fleet", "server", str(fleet.fleet),
                            "--device-keys", str(fleet.device_keys), "--key", str(fleet.server_key),
                            "--port", str(port), "--rounds", "2",
                            "--min-nodes", "3", "--json", str(fleet.root / "rounds.jsonl")],
                           capture_output=True, text=True, timeout=600)
    finally:
        for p in joins:
            p.terminate()
        for p in joins:
            p.wait(60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r1, r2 = (json.loads(line) for line in (fleet.root / "rounds.jsonl").read_text().splitlines())
    assert r1["synced"] == 3 and not r1["rejected"] and not r1["errors"], r1
    assert sorted(r1["accepted"]) == sorted(n for s in SHARES for n in s)
    all_names = [t.name for t in digits.tasks]
    for d in fleet.devices:
        b = Bundle.open(d, trust=_verifier(fleet, d))
        assert sorted(b.task_names) == sorted(all_names), d
        acc = task_il_acc(d, digits.tasks)
        assert min(acc.values()) >= 0.97, (d, acc)
        assert logits_bytes(d, own[d], x) == before[d]  # old tasks: byte-identical
        _task_files_never_change(d)
    fb = Bundle.open(fleet.fleet, trust=_verifier(fleet, fleet.fleet))  # the server signed it
    assert sorted(fb.task_names) == sorted(all_names)
    # selective sync: round 1 moved the new tasks' own bits and heads only; round 2 nothing but
    # the inventories
    assert r1["bytes_up"] + r1["bytes_down"] <= 0.10 * r1["fedavg_bytes"], r1
    assert r2["accepted"] == [] and all(a["added"] == [] for a in r2["acks"].values())
    assert r2["bytes_up"] + r2["bytes_down"] < 0.01 * r2["fedavg_bytes"]


@pytest.mark.slow
@needs_flower
def test_a_device_killed_mid_round_does_not_stall_it_and_catches_up(fleet, digits):
    # device 1 also holds a task whose origin signature was forged: refused and logged, the
    # round goes on
    src = Bundle.open(fleet.devices[0])
    rogue = fleet.root / "rogue.key"
    generate_key(rogue)
    with Transaction(fleet.devices[1], key=SigningKey.load(fleet.keys[1])) as tx:
        full = tx.add_task(dict(kind="weight_bits", classes=[2, 3], n_classes=2, method="supsup",
                                metrics={}, name="forged-2-3"), src.task_tensors("digits-2-3"))
        sha = hashlib.sha256(Path(src.root / src.task("digits-2-3")["file"]).read_bytes()).hexdigest()
        full["origin"] = dict(sign_part(SigningKey.load(rogue), "forged-2-3", sha),
                              key=SigningKey.load(fleet.keys[1]).key_id)
    dep = Deployment(fleet, delays=[0.0, 0.0, 10.0])
    try:
        def kill() -> None:
            dep.launch.stop(dep.nodes[2], signal.SIGKILL, timeout=1)

        killer = threading.Thread(target=_kill_when, args=(fleet.root / "flwr-run.log", "offering to", kill))
        killer.start()
        t0 = time.monotonic()
        (r1,) = dep.run(round_timeout=15.0)
        killer.join()
        assert time.monotonic() - t0 < 90
        assert r1["synced"] == 2 and r1["answered"] == 2 and len(r1["dropped"]) == 1, r1
        assert [r["task"] for r in r1["rejected"]] == ["forged-2-3"]
        assert "modified after signing" in r1["rejected"][0]["reason"]
        log = (dep.state / "rejected.jsonl").read_text()
        assert "forged-2-3" in log
        assert "digits-8-9" not in Bundle.open(fleet.devices[0]).task_names  # device 2 never uploaded
        dep.nodes[2] = dep.join(2)  # it comes back (the dead one counts as online until its
        # heartbeats lapse: wait for 4 nodes, and the dead one is left out after the timeout)
        (r2,) = dep.run(min_nodes=4, round_timeout=20.0)
    finally:
        dep.close()
    assert r2["synced"] == 3 and r2["accepted"] == ["digits-8-9"], r2
    all_names = sorted(t.name for t in digits.tasks)
    for d in fleet.devices:
        names = sorted(n for n in Bundle.open(d).task_names if n != "forged-2-3")
        assert names == all_names, d
        assert min(task_il_acc(d, digits.tasks).values()) >= 0.97
        _task_files_never_change(d)
    assert "forged-2-3" not in Bundle.open(fleet.fleet).task_names


@pytest.mark.slow
@needs_flower
def test_a_server_killed_mid_round_loses_nothing_committed(fleet, digits):
    dep = Deployment(fleet, delays=[4.0, 4.0, 4.0])
    runlog = fleet.root / "flwr-run.log"
    try:
        done = threading.Event()
        out: dict = {}

        def run() -> None:
            try:
                out["r"] = dep.run(round_timeout=30.0)
            except Exception as e:  # the run dies with the server, as it should
                out["e"] = e
            done.set()

        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 90
        while "committed fleet version" not in (runlog.read_text() if runlog.exists() else ""):
            assert time.monotonic() < deadline, "the round never committed"
            time.sleep(0.2)
        dep.launch.stop(dep.link, signal.SIGKILL, timeout=1)  # the SuperLink and the ServerApp under it
        done.wait(120)
        th.join()
        committed = Bundle.open(fleet.fleet, trust=_verifier(fleet, fleet.fleet))
        assert sorted(committed.task_names) == sorted(t.name for t in digits.tasks)
        assert "r" not in out
        # the server comes back on the same port and state; the devices reconnect
        dep.link = dep.launch.start_superlink(dep.port, dep.state, log=fleet.root / "superlink2.log")
        (r,) = dep.run(round_timeout=30.0)
    finally:
        dep.close()
    assert r["accepted"] == [] and r["fleet"]["version"] == committed.version, r  # nothing lost or redone
    assert r["synced"] == 3
    for d in fleet.devices:
        assert sorted(Bundle.open(d).task_names) == sorted(t.name for t in digits.tasks)
        assert min(task_il_acc(d, digits.tasks).values()) >= 0.97
        _task_files_never_change(d)


def test_fleet_cli_names_what_is_wrong(fleet, tmp_path, capsys, monkeypatch):
    from edgecl.tools.cli import main

    monkeypatch.delenv("EDGECL_SIGNING_KEY", raising=False)
    assert main(["fleet", "server", str(tmp_path / "nowhere"), "--device-keys", str(fleet.device_keys)]) == 2
    assert "nowhere" in capsys.readouterr().err
    empty = tmp_path / "empty-keys"
    empty.mkdir()
    assert main(["fleet", "server", str(fleet.fleet), "--device-keys", str(empty), "--key",
                 str(fleet.server_key)]) == 2
    assert "holds no *.pub key" in capsys.readouterr().err
    assert main(["fleet", "server", str(fleet.fleet), "--device-keys", str(fleet.device_keys)]) == 2
    assert "give --key" in capsys.readouterr().err
    assert main(["fleet", "join", str(tmp_path / "nowhere"), "--server", "127.0.0.1:1", "--key",
                 str(fleet.keys[0]), "--trust-store", str(fleet.trust[0])]) == 2
    assert "nowhere" in capsys.readouterr().err


# -- one fleet node on the emulated Pi (arm64 bookworm under qemu user mode, docs/deploy.md) --------
_PI_SERVE = r"""
import base64, io, json, sys
import numpy as np
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.fleet.sync import inventory
from edgecl.runtime.session import Runtime

b = Bundle.open(sys.argv[1])
x = np.load(io.BytesIO(base64.b64decode(sys.stdin.read())))
rt = Runtime(b)
buf = io.BytesIO()
np.savez(buf, **{n: rt.logits(x, n) for n in b.task_names})
print(json.dumps({"inventory": inventory(b), "version": b.version,
                  "logits": base64.b64encode(buf.getvalue()).decode()}))
"""


def _stop_pi_node(pid: int) -> None:
    """The Pi's `edgecl fleet join` (and its SuperNode) by pid: the emulator shares the
    host's pid namespace, so the host signals them directly."""
    from edgecl.runtime.fleet import launch

    pids = [pid, *launch._descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.mark.slow
@needs_flower
def test_the_emulated_pi_is_a_fleet_node(fleet, digits, tmp_path, monkeypatch):
    """Device 2 is the emulated Pi 4: `edgecl deploy --fleet` installs edgecl and Flower
    there (aarch64 wheels, Python 3.11), its `edgecl fleet join` runs a SuperNode inside
    the emulator that joins the SuperLink on the host over loopback (qemu user mode shares
    the host's network), uploads the task it learned, and ends with every task of the fleet,
    byte-identical, serving them as the host does. Correctness only: qemu is slow."""
    if os.geteuid() != 0:
        pytest.skip("the emulator needs root (binfmt_misc, mount namespaces, chroot)")
    import base64
    import dataclasses
    import io

    from edgecl.runtime.fleet.sync import inventory
    from edgecl.tools import deploy as dep
    from edgecl.tools.emulator import Emulator

    pi_bundle, pi_key = fleet.devices[2], fleet.keys[2]
    x = _x(digits)
    monkeypatch.setenv("EDGECL_SIGNING_KEY", str(pi_key))  # deploy's golden outputs: signed by the Pi's key
    emu = Emulator("rpi4", workdir=tmp_path / "emulator")
    emu.start()
    host = dataclasses.replace(fleet, devices=fleet.devices[:2], keys=fleet.keys[:2], trust=fleet.trust[:2])
    dep_, pid = None, None
    try:
        kw = {"identity": str(emu.identity), "known_hosts": str(tmp_path / "known_hosts")}
        r = dep.deploy(pi_bundle, emu.url, "rpi4", backends="numpy", fleet=True, log=lambda _m: None, **kw)
        assert r["smoke"]["ok"] and r["emulated"], r["smoke"]
        base = r["remote_dir"]
        remote = dep.Remote(emu.url, **kw)
        # the Pi's own fleet bundle (a copy of the deployed one), its key and whose tasks it trusts
        only_key = tmp_path / "pi-key"
        only_key.mkdir()
        shutil.copy(pi_key, only_key / pi_key.name)
        remote.rsync(only_key, "fleet/key")
        remote.rsync(fleet.trust[2], "fleet/trust")
        remote.run(f"rm -rf fleet/bundle && cp -a {base}/current/bundle fleet/bundle")
        dep_ = Deployment(host)  # the SuperLink and devices 0 and 1 on the host
        py = f"{base}/current/venv/bin/python"
        out = remote.run(
            f"cd ~; nohup {py} -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' "
            f"{py} -m edgecl.tools.cli fleet join fleet/bundle --server 127.0.0.1:{dep_.port} "
            f"--key fleet/key/{pi_key.name} --trust-store fleet/trust --port {free_port()} "
            f"> fleet/join.log 2>&1 < /dev/null & echo $!").stdout
        pid = int(out.strip().splitlines()[-1])
        try:
            (r1,) = dep_.run(min_nodes=3, wait_s=600.0, round_timeout=600.0)
        except RuntimeError as e:
            raise AssertionError(f"{e}\nthe Pi's `edgecl fleet join` log:\n"
                                 f"{remote.run('cat fleet/join.log', check=False).stdout[-3000:]}") from None
        join_log = remote.run("cat fleet/join.log", check=False).stdout
        # the Pi serves every task: logits from its own runtime, compared with the host's
        xb = io.BytesIO()
        np.save(xb, x)
        served = remote.run(f"{py} -c {shlex.quote(_PI_SERVE)} fleet/bundle", timeout=900,
                            input=base64.b64encode(xb.getvalue()).decode(), what="serving on the Pi")
    finally:
        if pid is not None:
            _stop_pi_node(pid)
        if dep_ is not None:
            dep_.close()
        emu.stop()
    assert r1["synced"] == 3 and not r1["rejected"] and not r1["errors"], (r1, join_log[-3000:])
    assert sorted(r1["accepted"]) == sorted(n for s in SHARES for n in s)
    fleet_inv = inventory(Bundle.open(fleet.fleet, trust=_verifier(fleet, fleet.fleet)))
    assert sorted(fleet_inv) == sorted(t.name for t in digits.tasks)
    for d in fleet.devices[:2]:
        assert inventory(Bundle.open(d, trust=_verifier(fleet, d))) == fleet_inv, d
    pi = json.loads(served.stdout.strip().splitlines()[-1])
    assert pi["inventory"] == fleet_inv  # every task file on the Pi: the fleet's very bytes
    logits = np.load(io.BytesIO(base64.b64decode(pi["logits"])))
    ref = logits_bytes(fleet.fleet, sorted(fleet_inv), x)
    for t in digits.tasks:
        want = np.frombuffer(ref[t.name], logits[t.name].dtype).reshape(logits[t.name].shape)
        assert np.max(np.abs(logits[t.name] - want)) <= 1e-4, t.name  # aarch64 numpy vs the host's
    at = 0
    for t in digits.tasks:  # Task-IL accuracy of the Pi's own answers, task by task
        n = len(t.x_test)
        acc = float((logits[t.name][at:at + n].argmax(1) == t.y_test).mean())
        assert acc >= 0.97, (t.name, acc)
        at += n
