"""``edgecl fleet server BUNDLE`` and ``edgecl fleet join BUNDLE --server HOST:PORT``: a fleet
of devices that sync only the tasks they learn, on Flower (docs/fleet.md).

``server`` starts a Flower SuperLink (or uses a running one, ``--superlink``) and runs the
fleet's ServerApp on it for ``--rounds`` rounds, printing one JSON line per round; the
fleet bundle gets one signed version per round that changed it. ``join`` runs a Flower
SuperNode for a device bundle (next to the daemon) until it is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fleet", help="sync the tasks devices learn through a Flower fleet (docs/fleet.md)",
                       description="A fleet on Flower: 'server' consolidates the tasks devices learn "
                                   "into a signed fleet bundle; 'join' connects a device bundle.")
    fs = p.add_subparsers(dest="fleet_command", metavar="{server,join}", required=True)
    s = fs.add_parser("server", help="run the fleet's ServerApp on a SuperLink")
    s.add_argument("bundle", help="the fleet bundle (a copy of the bundle the devices started from)")
    s.add_argument("--device-keys", required=True, metavar="DIR",
                   help="a directory of the devices' *.pub keys: uploads signed by any other key are refused")
    s.add_argument("--key", metavar="KEY", help="the server's signing key (default: $EDGECL_SIGNING_KEY)")
    s.add_argument("--host", default="127.0.0.1", help="the SuperLink's address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9092, help="the SuperLink's port (default 9092)")
    s.add_argument("--superlink", metavar="HOST:PORT", help="use this running SuperLink; start none")
    s.add_argument("--rounds", type=int, default=1, help="rounds to run (default 1)")
    s.add_argument("--min-nodes", type=int, default=1, help="devices to wait for before round 1")
    s.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for them (default 60)")
    s.add_argument("--round-timeout-s", type=float, default=60.0,
                   help="a device that has not answered by then is left out of the round (default 60)")
    s.add_argument("--state-dir", metavar="DIR", help="contributions, logs (default BUNDLE.fleet/)")
    s.add_argument("--fedavg", action="store_true",
                   help="run one round of dense FedAvg of the whole model instead (the bench's peer)")
    s.add_argument("--json", metavar="FILE", help="also write the round reports here (JSON lines)")
    s.set_defaults(func=main_server)
    j = fs.add_parser("join", help="run a Flower SuperNode for a device bundle")
    j.add_argument("bundle", help="the device's bundle")
    j.add_argument("--server", required=True, metavar="HOST:PORT", help="the fleet's SuperLink")
    j.add_argument("--key", required=True, metavar="KEY", help="the device's signing key (signs its uploads)")
    j.add_argument("--trust-store", required=True, metavar="DIR",
                   help="the keys whose tasks the device accepts: the server's and the devices'")
    j.add_argument("--port", type=int, default=9094, help="the SuperNode's loopback runtime API port")
    j.add_argument("--state-dir", metavar="DIR",
                   help="Flower's home for this node (default BUNDLE.fleet-node/)")
    j.set_defaults(func=main_join)
    return p


def _check_bundle(path: str) -> Path:
    from edgecl.runtime.bundle import Bundle

    root = Path(path)
    Bundle.open(root)  # a clear error now, not inside Flower's processes
    return root.resolve()


def main_server(args: argparse.Namespace) -> int:
    from edgecl.runtime.fleet import launch
    from edgecl.runtime.fleet.sync import FleetError
    from edgecl.runtime.signing import TrustStore

    root = _check_bundle(args.bundle)
    TrustStore(Path(args.device_keys))  # names the directory when it holds no key
    key = args.key or os.environ.get("EDGECL_SIGNING_KEY", "")
    if not key:
        raise FleetError("the server signs every fleet-bundle version: give --key KEY "
                         "(or $EDGECL_SIGNING_KEY)")
    state = Path(args.state_dir) if args.state_dir else root.with_name(root.name + ".fleet")
    state.mkdir(parents=True, exist_ok=True)
    report = Path(args.json).resolve() if args.json else Path(tempfile.mkstemp(suffix=".jsonl", dir=state)[1])
    start = report.stat().st_size if report.exists() else 0
    conf = {"bundle": str(root), "trust-store": str(Path(args.device_keys).resolve()),
            "key": str(Path(key).resolve()), "state-dir": str(state.resolve()), "report": str(report),
            "mode": "fedavg" if args.fedavg else "sync", "rounds": args.rounds, "min-nodes": args.min_nodes,
            "wait-s": args.wait_s, "round-timeout-s": args.round_timeout_s}
    link = None
    address = args.superlink or f"{args.host}:{args.port}"
    try:
        if not args.superlink:
            link = launch.start_superlink(args.port, state, host=args.host, log=state / "superlink.log")
        budget = args.wait_s + args.rounds * (2 * args.round_timeout_s + 60) + 120
        rc = launch.run_fleet_app(state, address, conf, timeout=budget, log=state / "flwr-run.log")
    finally:
        if link is not None:
            launch.stop(link, signal.SIGTERM)
    lines = report.read_text()[start:].splitlines() if report.exists() else []
    for line in lines:
        print(line)
    if not args.json:
        report.unlink(missing_ok=True)
    if rc != 0 or not lines:
        raise FleetError(f"the fleet run failed (flwr exit code {rc}, {len(lines)} round(s) reported); "
                         f"see {state / 'flwr-run.log'} and {state / 'superlink.log'}")
    for rec in (json.loads(x) for x in lines):
        for r in rec.get("rejected", []):
            print(f"edgecl fleet: refused an upload from node {r.get('node')}: {r.get('reason')}")
    return 0


def main_join(args: argparse.Namespace) -> int:
    from edgecl.runtime.fleet import launch

    root = _check_bundle(args.bundle)
    home = Path(args.state_dir) if args.state_dir else root.with_name(root.name + ".fleet-node")
    p = launch.start_supernode(root, args.server, port=args.port, key=Path(args.key),
                               trust_store=Path(args.trust_store), home=home)
    print(f"edgecl fleet join: SuperNode {p.pid} for {root} on {args.server}", flush=True)

    class _Stopped(Exception):
        pass

    def _stop(signum, _frame):
        # only raise here: stopping the node inside the handler would re-enter p.wait()
        raise _Stopped

    signal.signal(signal.SIGTERM, _stop)
    try:
        return p.wait()
    except _Stopped:
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        launch.stop(p, signal.SIGTERM)  # the SuperNode and what it started
