"""The fleet's protocol, without Flower: what a device offers, what the server accepts,
how it consolidates, and what a device is sent back (docs/fleet.md).

A *part* is one task as it travels: its manifest entry (kind, classes, method, metrics),
its task file's bytes (the kind's tensors and the head, exactly as in the bundle), the
``origin`` signature of the key that produced it (docs/bundle.md) and the sha256 of the
graph and backbone it runs on. Nothing else travels: no backbone, no sample.

Device side (numpy, safetensors, cryptography; no torch, no Flower): :func:`inventory`,
:func:`offer`, :func:`apply_parts`. Server side: :class:`FleetStore`.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..bundle_format import atomic_write_bytes
from ..bundle_write import Transaction, safetensors_bytes
from ..errors import BundleError, EdgeclError
from ..kinds import TaskView, check_head, get_kind
from ..safetensors_mmap import parse_safetensors

# entry keys a receiver recomputes (add_task) or must not trust from the sender
_LOCAL_KEYS = ("index", "file", "revision", "storage", "origin", "graph", "backbone")
# how several devices' versions of one task combine (docs/fleet.md: the rule and why)
RULE = "mask bits: sample-weighted majority vote; float tensors and head: sample-weighted mean"


class FleetError(EdgeclError):
    """A fleet part or state is unusable; the message names what and where."""


def graph_sha(bundle: Bundle, backbone: str) -> str:
    model = bundle.manifest["graphs"][bundle.manifest["backbones"][backbone]["graph"]]
    return hashlib.sha256(json.dumps(model, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def backbone_sha(bundle: Bundle, backbone: str) -> str:
    return bundle.file_sha256(bundle.backbone_file(backbone))


def inventory(bundle: Bundle) -> dict[str, str]:
    """Task name -> sha256 of its file: what a device (or the fleet) holds."""
    return {t["name"]: bundle.file_sha256(t["file"]) for t in bundle.tasks}


def make_part(bundle: Bundle, name: str) -> dict:
    """One task of ``bundle`` as it travels (see the module docstring)."""
    t = bundle.task(name)
    data = bundle.store.read(t["file"])
    entry = {k: v for k, v in t.items() if k not in _LOCAL_KEYS}
    return {"name": name, "entry": entry, "data": data, "sha256": hashlib.sha256(data).hexdigest(),
            "origin": t.get("origin"), "graph_sha": graph_sha(bundle, t["backbone"]),
            "backbone_sha": backbone_sha(bundle, t["backbone"]),
            "samples": _samples(t)}


def _samples(entry: dict) -> int:
    """The sample count a device reports for its task (the head-averaging weight); 1 when
    the bundle does not record it."""
    m = entry.get("metrics") or {}
    for k in ("samples", "n_train"):
        v = m.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 1


def offer(bundle: Bundle, key_id: str, fleet_has: set[str]) -> list[dict]:
    """The tasks this device learned itself (their ``origin`` is its key) that the fleet
    has not received yet (``fleet_has``: sha256 of every part the server stored)."""
    out = []
    for t in bundle.tasks:
        origin = t.get("origin") or {}
        if origin.get("key") == key_id and bundle.file_sha256(t["file"]) not in fleet_has:
            out.append(make_part(bundle, t["name"]))
    return out


# -- encoding for the wire (Flower ConfigRecords hold str, int and bytes) -----------------
# A message's payload is one zlib stream: a JSON document (compact, one line), a newline,
# then the task files' bytes back to back (their sizes are in the document). One stream per
# message, so what parts share (the safetensors headers, the graph and backbone hashes, key
# ids) travels once. The receiver inflates it and checks every part exactly as before: the
# signature and the sha256 are over the task file's original bytes.
MAX_PAYLOAD = 1 << 30  # inflated bytes a receiver accepts in one message (a zlib bomb stops here)


def pack(doc: dict, blobs: list[bytes]) -> bytes:
    """``doc`` and ``blobs`` as one message's payload (see above)."""
    head = json.dumps(dict(doc, sizes=[len(b) for b in blobs]), sort_keys=True, separators=(",", ":"))
    return zlib.compress(head.encode() + b"\n" + b"".join(blobs), 9)


def unpack(payload: bytes, where: str, limit: int = MAX_PAYLOAD) -> tuple[dict, list[bytes]]:
    """(document, blobs) of a payload made by :func:`pack`; FleetError naming ``where`` when
    it is not one (not zlib, truncated, over ``limit`` bytes inflated, sizes that do not add up)."""
    if not isinstance(payload, bytes):
        raise FleetError(f"{where}: the payload is {type(payload).__name__}, not bytes")
    z = zlib.decompressobj()
    try:
        raw = z.decompress(payload, limit + 1)
    except zlib.error as e:
        raise FleetError(f"{where}: the payload is not a zlib stream ({e})") from None
    if len(raw) > limit or z.unconsumed_tail:
        raise FleetError(f"{where}: the payload inflates to more than {limit:,} bytes; refused")
    if not z.eof:
        raise FleetError(f"{where}: the payload is truncated (its zlib stream does not end)")
    head, sep, body = raw.partition(b"\n")
    try:
        doc = json.loads(head) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FleetError(f"{where}: the payload's document is not JSON ({e})") from None
    sizes = doc.get("sizes") if isinstance(doc, dict) else None
    if not (isinstance(sizes, list) and all(isinstance(n, int) and n >= 0 for n in sizes)
            and sum(sizes) == len(body)):
        raise FleetError(f"{where}: the payload's file sizes do not match its {len(body):,} bytes of files")
    blobs, at = [], 0
    for n in sizes:
        blobs.append(body[at:at + n])
        at += n
    return doc, blobs


def encode_parts(parts: list[dict], **doc) -> bytes:
    """``parts`` (and the JSON-able ``doc`` entries) as one payload: nothing else travels."""
    meta = [{k: v for k, v in p.items() if k != "data"} for p in parts]
    return pack(dict(doc, parts=meta), [p["data"] for p in parts])


def decode_parts(payload: bytes, where: str) -> tuple[dict, list[dict]]:
    """(the payload's document, its parts, each with its ``data``); FleetError naming ``where``."""
    doc, blobs = unpack(payload, where)
    meta = doc.get("parts")
    if not isinstance(meta, list) or len(meta) != len(blobs):
        raise FleetError(f"{where}: the payload holds {len(blobs)} files for "
                         f"{len(meta) if isinstance(meta, list) else 'no list of'} parts")
    out = []
    for i, m in enumerate(meta):
        if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("entry"), dict)):
            raise FleetError(f"{where}: part {i} lacks its name or entry")
        out.append(dict(m, data=blobs[i]))
    return doc, out


def encode_have(shas) -> bytes:
    """A set of sha256 hex digests as their raw 32 bytes each (sorted)."""
    return b"".join(bytes.fromhex(h) for h in sorted(shas))


def decode_have(data: bytes, where: str) -> set[str]:
    if not isinstance(data, bytes) or len(data) % 32:
        raise FleetError(f"{where}: the fleet's inventory is not a run of 32-byte sha256 digests")
    return {data[i:i + 32].hex() for i in range(0, len(data), 32)}


# -- checks shared by both sides -----------------------------------------------------------
def check_part(bundle: Bundle, part: dict, trust, where: str) -> tuple[str, dict[str, np.ndarray]]:
    """The part's signer (key id) and tensors once its signature verifies against ``trust``,
    its file hashes to what it claims, it runs on ``bundle``'s very graph and backbone and
    its kind validates it; else FleetError naming the part and ``where`` it came from."""
    name = part["name"]
    what = f"{where}: part {name!r}"
    data = part["data"]
    sha = hashlib.sha256(data).hexdigest()
    if part.get("sha256") not in (None, sha):
        raise FleetError(f"{what}: its file does not hash to the sha256 it claims (tampered in transit)")
    if trust is None:
        raise FleetError(f"{what}: no trust store to verify its signature (give --trust-store)")
    try:
        signer = trust.verify_part(name, sha, part.get("origin"), Path(where))
    except BundleError as e:
        raise FleetError(f"{what}: refused: {e.reason}") from None
    entry = part["entry"]
    if entry.get("depends"):
        raise FleetError(f"{what}: a task built from other tasks ({entry['depends']}) cannot travel alone")
    main = bundle.main
    ours = (graph_sha(bundle, main), backbone_sha(bundle, main))
    if (part.get("graph_sha"), part.get("backbone_sha")) != ours:
        raise FleetError(f"{what}: learned on another graph or backbone than {bundle.root}'s "
                         f"(a method that changed the shared backbone, or another model); a fleet "
                         f"syncs tasks over one backbone (learn with supsup or head)")
    try:
        kind = get_kind(entry.get("kind", ""))
        tensors, _ = parse_safetensors(data, f"{what}", copy=True)
        view = TaskView(dict(entry, name=name), tensors, bundle.graph, bundle.backbone, what)
        kind.validate(view)
        check_head(view)
    except (BundleError, KeyError, ValueError) as e:
        raise FleetError(f"{what}: not a valid task file ({e})") from None
    return signer, tensors


# -- the device applies what it lacks -----------------------------------------------------
def apply_parts(bundle_dir: str | Path, parts: list[dict], *, key, trust, note: str) -> dict:
    """Add the tasks in ``parts`` that the device lacks, as one new bundle version signed by
    ``key``; each keeps the ``origin`` of the key that produced it (the bytes are the
    same). The backbone is untouched, so every old task's outputs stay byte-identical.

    Routers are dropped from that version: refitting one needs samples of the new tasks,
    which never leave the device that learned them (docs/fleet.md)."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    have = set(bundle.task_names)
    todo = []
    for p in parts:
        if p["name"] in have:
            continue
        _, tensors = check_part(bundle, p, trust, where=f"fleet download to {root}")
        todo.append((p, tensors))
    if not todo:
        return {"version": bundle.version, "added": []}
    with Transaction(root, key=key, note=note) as tx:
        if tx.previous["version"] != bundle.version:
            raise FleetError(f"{root}: the bundle moved on to version {tx.previous['version']} while "
                             f"syncing (from {bundle.version}); the next round retries")
        for p, tensors in todo:
            full = tx.add_task(dict(p["entry"], name=p["name"]), tensors)
            if p.get("origin") is not None:
                full["origin"] = p["origin"]  # who produced it, not who stored it
        if tx.manifest.get("routers"):
            tx.manifest["routers"] = {}
            tx.manifest.pop("default_router", None)
    return {"version": tx.version, "added": [p["name"] for p, _ in todo]}


# -- the server: contributions and the fleet bundle ---------------------------------------
class FleetStore:
    """The server's state: the fleet bundle and, beside it (``<bundle>.fleet/``), every
    accepted contribution (one file per upload, written atomically before it is
    acknowledged) and the log of rejected uploads. Consolidation is recomputed from the
    contributions, so a server killed at any instant loses nothing it acknowledged."""

    def __init__(self, bundle_dir: str | Path, *, key, trust, state_dir: str | Path | None = None) -> None:
        self.root = Path(bundle_dir)
        self.state = Path(state_dir) if state_dir else self.root.with_name(self.root.name + ".fleet")
        self.contrib = self.state / "contrib"
        self.contrib.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.trust = trust
        self.bundle = Bundle.open(self.root)

    def have(self) -> set[str]:
        """sha256 of every task file the fleet holds: the bundle's and every contribution's."""
        out = set(inventory(Bundle.open(self.root)).values())
        out |= {p.stem for p in self.contrib.glob("*.json")}
        return out

    def _contributions(self) -> list[dict]:
        out = []
        for p in sorted(self.contrib.glob("*.json")):
            meta = json.loads(p.read_text())
            meta["data"] = (self.contrib / f"{p.stem}.safetensors").read_bytes()
            out.append(meta)
        return sorted(out, key=lambda m: (m["received"], m["sha256"]))

    def accept(self, parts: list[dict], node: str) -> tuple[list[str], list[dict]]:
        """Verify and store each uploaded part; return (accepted names, rejections). A
        rejection is logged to ``rejected.jsonl`` with the node and the reason."""
        bundle = Bundle.open(self.root)
        accepted, rejected = [], []
        for p in parts:
            try:
                signer, _ = check_part(bundle, p, self.trust, where=f"upload from node {node}")
                sha = hashlib.sha256(p["data"]).hexdigest()
                atomic_write_bytes(self.contrib / f"{sha}.safetensors", p["data"])
                meta = {k: v for k, v in p.items() if k != "data"}
                meta.update(sha256=sha, signer=signer, node=node, received=time.time())
                atomic_write_bytes(self.contrib / f"{sha}.json", json.dumps(meta, sort_keys=True).encode())
                accepted.append(p["name"])
            except FleetError as e:
                rec = {"time": time.time(), "node": node, "task": p.get("name"), "reason": str(e)}
                rejected.append(rec)
                self._log(rec)
        return accepted, rejected

    def _log(self, rec: dict) -> None:
        with open(self.state / "rejected.jsonl", "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    def consolidate(self, note: str) -> dict:
        """Bring the fleet bundle up to the contributions: one new signed version holding
        each new task (one contributor: its file as uploaded, its origin kept) or a new
        revision of a task several devices learned (aggregated, signed by the server)."""
        groups: dict[str, dict[str, dict]] = {}
        for c in self._contributions():
            groups.setdefault(c["name"], {})[c["signer"]] = c  # a signer's latest upload counts
        bundle = Bundle.open(self.root)
        have = inventory(bundle)
        plans = []
        for name, by_signer in sorted(groups.items()):
            contribs = [by_signer[k] for k in sorted(by_signer)]
            classes = contribs[0]["entry"].get("classes")
            for c in contribs:
                if c["entry"].get("classes") != classes:  # not the same task: kept out, and said
                    self._log({"time": time.time(), "node": c["node"], "task": name,
                               "reason": f"task {name!r} from key {c['signer']} has classes "
                                         f"{c['entry'].get('classes')}, another device's has {classes}: "
                                         f"not combined"})
            contribs = [c for c in contribs if c["entry"].get("classes") == classes]
            if len(contribs) == 1:
                c = contribs[0]
                if have.get(name) == c["sha256"]:
                    continue
                tensors, _ = parse_safetensors(c["data"], name, copy=True)
                plans.append((name, c["entry"], tensors, c["origin"], None))
                continue
            tensors = aggregate([parse_safetensors(c["data"], name, copy=True)[0] for c in contribs],
                                [int(c.get("samples") or 1) for c in contribs])
            if have.get(name) == hashlib.sha256(safetensors_bytes(tensors, {"edgecl": "task"})).hexdigest():
                continue
            fleet = {"contributors": [c["signer"] for c in contribs],
                     "samples": [int(c.get("samples") or 1) for c in contribs], "rule": RULE}
            plans.append((name, contribs[0]["entry"], tensors, None, fleet))
        if not plans:
            return {"version": bundle.version, "added": [], "revised": []}
        added, revised = [], []
        with Transaction(self.root, key=self.key, note=note) as tx:
            names = {t["name"] for t in tx.manifest["tasks"]}
            for name, entry, tensors, origin, fleet in plans:
                e = dict(entry, name=name)
                if fleet is not None:
                    e["fleet"] = fleet
                full = tx.add_task(e, tensors, supersede=name in names)
                (revised if name in names else added).append(name)
                if origin is not None:
                    full["origin"] = origin
        return {"version": tx.version, "added": added, "revised": revised}

    def missing_for(self, device_has: Mapping[str, str]) -> list[dict]:
        """The fleet's tasks a device lacks (by name: a task the device learned itself stays
        its own, never replaced under it)."""
        bundle = Bundle.open(self.root)
        return [make_part(bundle, n) for n in bundle.task_names if n not in device_has]


def aggregate(tensors: list[Mapping[str, np.ndarray]], samples: list[int]) -> dict[str, np.ndarray]:
    """Several devices' versions of one task as one (docs/fleet.md): packed mask bits
    (``mask.*``, uint8) and gates (``gate.*``) by a sample-weighted majority vote (a tie
    keeps the bit); float tensors (the head, soft masks, LoRA) by the sample-weighted mean;
    anything else (hash seeds) from the device with the most samples."""
    keys = set(tensors[0])
    for t in tensors[1:]:
        if set(t) != keys or any(t[k].shape != tensors[0][k].shape for k in keys):
            raise FleetError("the devices' versions of the task hold different tensors; cannot combine them")
    w = np.asarray(samples, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for k in sorted(keys):
        arrs = [np.asarray(t[k]) for t in tensors]
        a0 = arrs[0]
        if k.startswith("mask.") and a0.dtype == np.uint8:
            bits = np.stack([np.unpackbits(a, bitorder="little") for a in arrs]).astype(np.float64)
            vote = np.tensordot(w, bits, axes=1) >= 0.5
            out[k] = np.packbits(vote.astype(np.uint8), bitorder="little")[: a0.size]
        elif k.startswith("gate.") and a0.dtype == np.uint8:
            out[k] = (np.tensordot(w, np.stack(arrs).astype(np.float64), axes=1) >= 0.5).astype(np.uint8)
        elif np.issubdtype(a0.dtype, np.floating):
            out[k] = np.tensordot(w, np.stack(arrs).astype(np.float64), axes=1).astype(a0.dtype)
        else:
            out[k] = arrs[int(np.argmax(samples))].copy()
    return out
