"""The fleet's Flower apps: ``server`` (a ServerApp, run by the SuperLink) and ``client``
(a ClientApp, run by each device's SuperNode), made when Flower's processes
(``flwr-serverapp``, ``flwr-clientapp``) ask for them; the protocol itself is :mod:`.sync`.

A round, with the Message API (``grid.send_and_receive``):

1. ``query.offer`` to every connected node: the sha256 of every task part the fleet holds;
   each device answers with the parts it learned itself that the fleet lacks (signed by
   its key) and its inventory (task name -> sha256).
2. The server verifies each part (signature, hash, graph/backbone, kind), stores it, and
   consolidates: one new signed fleet-bundle version (or none when nothing changed).
3. ``query.deliver`` to every node that answered: only the tasks it lacks; it commits
   them as one version of its own bundle and acknowledges.

A node that does not answer within ``round-timeout-s`` is left out of that round (it
catches up in a later one); a refused part is logged and the round goes on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Bundle
from . import sync

if TYPE_CHECKING:  # Flower is imported when its processes ask for ``server`` or ``client``
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

_APPS: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``server`` and ``client``, made on first use: the module imports without Flower (a
    device on Python 3.10, where Flower 1.42 does not install, still imports the runtime)."""
    if name not in ("server", "client"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _APPS:
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp

        srv, cli = ServerApp(), ClientApp()
        srv.main()(main)
        cli.query("offer")(on_offer)
        cli.query("deliver")(on_deliver)
        cli.query("fedavg")(on_fedavg)
        _APPS.update(server=srv, client=cli)
    return _APPS[name]


def _records():
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    return ArrayRecord, ConfigRecord, Message, RecordDict


def _cfg(context: Context, key: str, default=None):
    v = context.run_config.get(key, default)
    return default if v == "" else v


def _key(path: str | None):
    from ..signing import SigningKey

    return SigningKey.load(Path(path)) if path else None


def _trust(path: str | None):
    from ..signing import TrustStore

    return TrustStore(Path(path), Path(path) / ".fleet-seen.json") if path else None


def _report(path: str | None, rec: dict) -> None:
    line = json.dumps(rec, sort_keys=True)
    print(f"edgecl fleet: {line}", flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _wait_for_nodes(grid: Grid, n: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n or time.monotonic() >= deadline:
            return ids
        time.sleep(0.2)


def main(grid: Grid, context: Context) -> None:
    report = _cfg(context, "report")
    store = sync.FleetStore(_cfg(context, "bundle"), key=_key(_cfg(context, "key")),
                            trust=_trust(_cfg(context, "trust-store")),
                            state_dir=_cfg(context, "state-dir"))
    timeout = float(_cfg(context, "round-timeout-s", 60.0))
    ids = _wait_for_nodes(grid, int(_cfg(context, "min-nodes", 1)), float(_cfg(context, "wait-s", 60.0)))
    if _cfg(context, "mode", "sync") == "fedavg":
        _report(report, fedavg_round(grid, store, ids, timeout))
        return
    for r in range(1, int(_cfg(context, "rounds", 1)) + 1):
        if r > 1:
            ids = sorted(grid.get_node_ids())
        _report(report, sync_round(grid, store, ids, r, timeout))


def sync_round(grid: Grid, store: sync.FleetStore, ids: list[int], r: int, timeout: float) -> dict:
    _, ConfigRecord, Message, RecordDict = _records()
    t0 = time.monotonic()
    offer = ConfigRecord({"have": sync.encode_have(store.have()), "round": r})
    down = len(offer["have"]) * len(ids)
    print(f"edgecl fleet: round {r}: offering to {len(ids)} nodes", flush=True)
    replies = grid.send_and_receive(
        [Message(RecordDict({"fleet": offer}), dst_node_id=n, message_type="query.offer") for n in ids],
        timeout=timeout)
    up, answered, inventories, accepted, rejected, errors = 0, [], {}, [], [], {}
    for rep in replies:
        node = rep.metadata.src_node_id
        if rep.has_error():
            errors[str(node)] = str(rep.error.reason)
            continue
        c = rep.content["up"]
        up += sum(len(v) if isinstance(v, bytes) else len(str(v).encode()) for v in c.values())
        if c.get("error"):
            errors[str(node)] = c["error"]
            continue
        try:
            if "payload" not in c:
                raise sync.FleetError(f"node {node}: its answer carries no payload (an older edgecl?)")
            doc, parts = sync.decode_parts(c["payload"], f"node {node}")
            inventory = doc.get("inventory")
            if not (isinstance(inventory, dict) and all(isinstance(v, str) for v in inventory.values())):
                raise sync.FleetError(f"node {node}: its answer lacks its inventory (task name -> sha256)")
        except sync.FleetError as e:
            rejected.append({"node": node, "reason": str(e)})
            continue
        ok, bad = store.accept(parts, str(node))
        accepted += ok
        rejected += bad
        inventories[node] = inventory
        answered.append(node)
    committed = store.consolidate(note=f"fleet round {r}")
    print(f"edgecl fleet: round {r}: committed fleet version {committed['version']}", flush=True)
    deliveries = []
    for node in answered:
        payload = sync.encode_parts(store.missing_for(inventories[node]))
        down += len(payload)
        deliveries.append(Message(RecordDict({"down": ConfigRecord({"payload": payload, "round": r})}),
                                  dst_node_id=node, message_type="query.deliver"))
    acks = {}
    for rep in grid.send_and_receive(deliveries, timeout=timeout) if deliveries else []:
        node = rep.metadata.src_node_id
        if rep.has_error():
            errors[str(node)] = str(rep.error.reason)
            continue
        a = rep.content["ack"]
        up += len(a["json"].encode())
        acks[str(node)] = json.loads(a["json"])
    return {"round": r, "nodes": len(ids), "answered": len(answered), "synced": len(acks),
            "dropped": sorted(str(n) for n in ids if n not in answered or str(n) not in acks),
            "accepted": accepted, "rejected": rejected, "errors": errors, "fleet": committed,
            "acks": acks, "bytes_up": up, "bytes_down": down,
            "fedavg_bytes": 2 * len(ids) * full_model_bytes(Bundle.open(store.root)),
            "seconds": round(time.monotonic() - t0, 3)}


def full_model_bytes(bundle: Bundle) -> int:
    """What one device sends (and receives) per round under FedAvg of all weights: the
    dense float32 backbone and every task's head (what :func:`fedavg_round` exchanges)."""
    return sum(a.nbytes for a in _full_model(bundle).values())


def _full_model(bundle: Bundle) -> dict[str, np.ndarray]:
    arrays = {f"backbone.{k}": np.array(v) for k, v in bundle.backbone.items()}
    for t in bundle.tasks:
        for k, v in bundle.task_tensors(t["name"]).items():
            if k.startswith("head."):
                arrays[f"{t['name']}.{k}"] = np.array(v)
    return arrays


def fedavg_round(grid: Grid, store: sync.FleetStore, ids: list[int], timeout: float) -> dict:
    """The peer: one round of FedAvg of the whole model over the same deployment (every
    device sends its dense weights, the server averages and sends the average back)."""
    ArrayRecord, ConfigRecord, Message, RecordDict = _records()
    t0 = time.monotonic()
    model = _full_model(Bundle.open(store.root))
    names = sorted(model)
    content = {"model": ArrayRecord([model[k] for k in names]),
               "names": ConfigRecord({"json": json.dumps(names)})}
    down = sum(v.nbytes for v in model.values()) * len(ids)
    replies = list(grid.send_and_receive(
        [Message(RecordDict(content), dst_node_id=n, message_type="query.fedavg") for n in ids],
        timeout=timeout))
    got = [r.content["model"].to_numpy_ndarrays() for r in replies if not r.has_error()]
    up = sum(sum(a.nbytes for a in arrs) for arrs in got)
    if got:
        _ = [np.mean(np.stack(col), axis=0) for col in zip(*got, strict=True)]
    return {"mode": "fedavg", "nodes": len(ids), "answered": len(got), "bytes_up": up, "bytes_down": down,
            "seconds": round(time.monotonic() - t0, 3)}


# -- the device ---------------------------------------------------------------------------------
def _node(context: Context, key: str, default=None):
    v = context.node_config.get(key, default)
    return default if v == "" else v


def _delay(context: Context) -> None:
    d = float(_node(context, "delay-s", 0) or 0)  # a slow device (tests kill one mid-round)
    if d > 0:
        time.sleep(d)


def on_offer(msg: Message, context: Context) -> Message:
    _, ConfigRecord, Message, RecordDict = _records()
    _delay(context)
    out: dict = {}
    try:
        bundle = Bundle.open(_node(context, "bundle"))
        key = _key(_node(context, "key"))
        if key is None:
            raise sync.FleetError("the node has no signing key (node config 'key'): it cannot sign uploads")
        parts = sync.offer(bundle, key.key_id, sync.decode_have(msg.content["fleet"]["have"], "the server"))
        out = {"payload": sync.encode_parts(parts, inventory=sync.inventory(bundle))}
    except Exception as e:  # the server logs it; the device keeps serving
        out["error"] = f"{type(e).__name__}: {e}"
    return Message(RecordDict({"up": ConfigRecord(out)}), reply_to=msg)


def on_deliver(msg: Message, context: Context) -> Message:
    _, ConfigRecord, Message, RecordDict = _records()
    _delay(context)
    c = msg.content["down"]
    try:
        root = _node(context, "bundle")
        _, parts = sync.decode_parts(c["payload"], "the server")
        res = sync.apply_parts(root, parts, key=_key(_node(context, "key")),
                               trust=_trust(_node(context, "trust-store")),
                               note=f"fleet round {c['round']}")
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}"}
    return Message(RecordDict({"ack": ConfigRecord({"json": json.dumps(res, sort_keys=True)})}), reply_to=msg)


def on_fedavg(msg: Message, context: Context) -> Message:
    ArrayRecord, _, Message, RecordDict = _records()
    bundle = Bundle.open(_node(context, "bundle"))
    # the device's own dense model, shaped like the server's (heads it lacks: the server's)
    mine = _full_model(bundle)
    theirs = msg.content["model"].to_numpy_ndarrays()
    names = json.loads(msg.content["names"]["json"])
    arrays = [mine.get(k, v) for k, v in zip(names, theirs, strict=True)]
    return Message(RecordDict({"model": ArrayRecord(arrays)}), reply_to=msg)
