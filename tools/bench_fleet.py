"""``edgecl bench fleet``: a fleet of three devices on loopback (a real SuperLink and three
SuperNodes, separate processes), each with its own bundle and its own share of the tasks;
bytes up and down and time per round of the selective sync, against one round of dense
FedAvg of the whole model over the same deployment, for the MLP and a zoo model.

``make_fleet`` (also used by tests/test_fleet.py) builds the fleet from a host run's
bundle: the fleet bundle and every device start from its first task; device i then holds
its share of the other tasks, committed with its own key (as ``edgecl learn --key`` on the
device would).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Fleet:
    root: Path
    fleet: Path  # the server's bundle
    server_key: Path
    device_keys: Path  # the devices' *.pub (the server's trust store)
    devices: list[Path] = field(default_factory=list)
    keys: list[Path] = field(default_factory=list)
    trust: list[Path] = field(default_factory=list)  # per device: the server's and devices' keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_task(src, tx, name: str) -> None:
    t = src.task(name)
    entry = {k: v for k, v in t.items() if k not in ("index", "file", "revision", "storage", "origin",
                                                     "graph", "backbone")}
    tx.add_task(entry, src.task_tensors(name))


def make_fleet(full_bundle: Path, root: Path, shares: list[list[str]]) -> Fleet:
    """Keys, the fleet bundle and one bundle per device (``shares[i]``: device i's own tasks)."""
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.bundle_format import MAIN
    from edgecl.runtime.bundle_write import Transaction
    from edgecl.runtime.signing import SigningKey, generate_key, public_key_path

    src = Bundle.open(full_bundle)
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    f = Fleet(root, root / "fleet", keys / "server.key", root / "device-keys")
    f.device_keys.mkdir(exist_ok=True)
    generate_key(f.server_key, name="fleet-server")
    for i in range(len(shares)):
        k = keys / f"device{i}.key"
        generate_key(k, name=f"device{i}")
        shutil.copy(public_key_path(k), f.device_keys / f"device{i}.pub")
        f.keys.append(k)
    base = root / "base"
    with Transaction(base, key=SigningKey.load(f.server_key), note="fleet base") as tx:
        tx.add_graph(MAIN, src.model)
        tx.add_backbone(MAIN, src.backbone)
        _copy_task(src, tx, src.task_names[0])
    shutil.copytree(base, f.fleet)
    for i, share in enumerate(shares):
        d = root / f"device{i}"
        shutil.copytree(base, d)
        with Transaction(d, key=SigningKey.load(f.keys[i]), note="learned on the device") as tx:
            for name in share:
                _copy_task(src, tx, name)
        t = root / f"trust{i}"
        t.mkdir()
        for p in [public_key_path(f.server_key), *f.device_keys.glob("*.pub")]:
            shutil.copy(p, t / p.name)
        f.devices.append(d)
        f.trust.append(t)
    shutil.rmtree(base)
    return f


def task_il_acc(bundle: Path, tasks) -> dict[str, float]:
    """Task-IL accuracy (the task given) on each Split-Digits task's test split."""
    from edgecl.runtime.session import Runtime

    rt = Runtime(bundle)
    out = {}
    for t in tasks:
        pred = rt.logits(t.x_test.reshape(len(t.x_test), -1), t.name).argmax(axis=1)
        out[t.name] = float((pred == t.y_test).mean())
    return out


def logits_bytes(bundle: Path, names: list[str], x: np.ndarray) -> dict[str, bytes]:
    from edgecl.runtime.session import Runtime

    rt = Runtime(bundle)
    return {n: rt.logits(x, n).tobytes() for n in names}


class Deployment:
    """A SuperLink and one SuperNode per device, on loopback, each its own process group."""

    def __init__(self, f: Fleet, *, delays: list[float] | None = None) -> None:
        from edgecl.runtime.fleet import launch

        self.f, self.launch = f, launch
        self.port = free_port()
        self.state = f.root / "fleet.state"
        self.link = launch.start_superlink(self.port, self.state, log=f.root / "superlink.log")
        self.nodes = [self.join(i, (delays or [0.0] * len(f.devices))[i]) for i in range(len(f.devices))]

    def join(self, i: int, delay: float = 0.0):
        return self.launch.start_supernode(
            self.f.devices[i], f"127.0.0.1:{self.port}", port=free_port(), key=self.f.keys[i],
            trust_store=self.f.trust[i], home=self.f.root / f"node{i}", delay_s=delay,
            log=self.f.root / f"node{i}.log")

    def run(self, *, rounds: int = 1, min_nodes: int | None = None, fedavg: bool = False,
            round_timeout: float = 60.0, wait_s: float = 60.0) -> list[dict]:
        report = self.f.root / f"report-{time.monotonic_ns()}.jsonl"
        conf = {"bundle": str(self.f.fleet.resolve()), "trust-store": str(self.f.device_keys.resolve()),
                "key": str(self.f.server_key.resolve()), "state-dir": str(self.state.resolve()),
                "report": str(report), "mode": "fedavg" if fedavg else "sync", "rounds": rounds,
                "min-nodes": len(self.f.devices) if min_nodes is None else min_nodes, "wait-s": wait_s,
                "round-timeout-s": round_timeout}
        rc = self.launch.run_fleet_app(self.state, f"127.0.0.1:{self.port}", conf,
                                       timeout=120 + wait_s + rounds * (2 * round_timeout + 30),
                                       log=self.f.root / "flwr-run.log")
        lines = report.read_text().splitlines() if report.exists() else []
        if rc != 0 or not lines:
            tail = (self.f.root / "flwr-run.log").read_text()[-3000:]
            raise RuntimeError(f"flwr run failed (exit {rc}, {len(lines)} rounds reported):\n{tail}")
        return [json.loads(x) for x in lines]

    def close(self) -> None:
        self.launch.stop([*self.nodes, self.link])


# -- the bench ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet-zoo", default="resnet8",
                   help="bench fleet: the zoo model besides the MLP (default resnet8; 'none': the MLP only)")
    p.add_argument("--fleet-out", metavar="DIR",
                   help="bench fleet: keep the fleets here (default: a temp dir)")


def _trained(arch: str, root: Path) -> Path:
    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.training import train

    run, bundle = root / f"run-{arch}", root / f"bundle-{arch}"
    if not (bundle / "manifest.json").is_file():
        print(f"bench fleet: training Split-Digits SupSup on {arch} once (host)", flush=True)
        if arch == "mlp":
            train("split-digits", "supsup", run, seed=0, arch=arch, log=lambda _m: None)
        else:  # a zoo backbone, Split-Digits fitted to its input; bytes are the point, not accuracy
            from edgecl.models.importer import import_model

            graph, weights = import_model(arch)
            train("split-digits", "supsup", run, seed=0, graph=graph, backbone=weights,
                  hparams={"epochs": 2}, log=lambda _m: None)
        bundle_run(run, bundle, routers=False)
    return bundle


def bench_one(full: Path, root: Path, model: str) -> dict:
    from edgecl.runtime.bundle import Bundle

    names = Bundle.open(full).task_names
    shares = [names[1:3], names[3:4], names[4:5]]
    f = make_fleet(full, root, shares)
    dep = Deployment(f)
    try:
        sync_rounds = dep.run(rounds=2)
        fedavg = dep.run(fedavg=True)[0]
    finally:
        dep.close()
    r1 = sync_rounds[0]
    return {"model": model, "devices": len(shares), "params": int(sum(np.asarray(a).size for a in
                                                                   Bundle.open(full).backbone.values())),
            "tasks": len(names), "rounds": sync_rounds, "fedavg": fedavg,
            "sync_bytes_round1": r1["bytes_up"] + r1["bytes_down"],
            "fedavg_bytes_round": fedavg["bytes_up"] + fedavg["bytes_down"],
            "ratio": (r1["bytes_up"] + r1["bytes_down"]) / max(1, fedavg["bytes_up"] + fedavg["bytes_down"])}


def render(rows: list[dict]) -> str:
    out = [f"{'model':>10}  {'phase':>14}  {'bytes up':>10}  {'bytes down':>10}  {'seconds':>8}"]
    for r in rows:
        for rec in r["rounds"]:
            out.append(f"{r['model']:>10}  {'sync round ' + str(rec['round']):>14}  {rec['bytes_up']:>10,}  "
                       f"{rec['bytes_down']:>10,}  {rec['seconds']:>8.2f}")
        fa = r["fedavg"]
        out.append(f"{r['model']:>10}  {'dense FedAvg':>14}  {fa['bytes_up']:>10,}  {fa['bytes_down']:>10,}  "
                   f"{fa['seconds']:>8.2f}")
        out.append(f"{r['model']:>10}  ({r['params']:,} weights) sync round 1 / FedAvg round bytes: "
                   f"{100 * r['ratio']:.2f} % (target <= 10 %)")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    import tempfile

    out = Path(args.fleet_out or tempfile.mkdtemp(prefix="bench-fleet-"))
    archs = ["mlp"] + ([] if args.fleet_zoo == "none" else [args.fleet_zoo])
    rows = []
    for arch in archs:
        full = _trained(arch, out)
        shutil.rmtree(out / f"fleet-{arch}", ignore_errors=True)
        rows.append(bench_one(full, out / f"fleet-{arch}", arch))
    print(render(rows))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return 0
