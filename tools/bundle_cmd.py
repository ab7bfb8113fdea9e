"""Bundle housekeeping commands: verify, log, gc, rollback, sign, migrate.

    edgecl verify B [--trust-store DIR]   hashes, signature, every task through its kind
    edgecl log B                          the version log: what each version changed
    edgecl gc B [--keep N]                retire old versions, delete unreferenced files
    edgecl rollback B --to V              a new version with version V's contents
    edgecl sign B --key KEY               a new, signed version (same contents)
    edgecl migrate B                      a format-1 bundle's current version as format 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecl.runtime.errors import EdgeclError

from . import tables


def _trust(args: argparse.Namespace):
    from edgecl.runtime.signing import TrustStore

    return TrustStore(Path(args.trust_store)) if getattr(args, "trust_store", None) else TrustStore.from_env()


def cmd_verify(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.session import activate

    trust = _trust(args)
    b = Bundle.open(args.bundle, trust=trust, allow_rollback=args.allow_rollback)
    signed = f"signed by key {b.signer}" if b.signer else (
        "signature not checked (no trust store: --trust-store DIR or EDGECL_TRUST_STORE)")
    print(f"{args.bundle}: version {b.version}, {len(b.manifest['files'])} files, hashes match; {signed}")
    rows = []
    for t in b.tasks:
        activate(b, t["name"])  # the kind validates and materializes it
        origin = t.get("origin")
        if origin is None:
            by = "unsigned"
        elif trust is None:
            by = f"key {origin.get('key')} (not checked)"
        else:
            by = "key " + trust.verify_part(t["name"], b.file_sha256(t["file"]), origin, b.where(t["file"]))
        rows.append([t["index"], t["name"], t["kind"], t.get("revision", 1), t["graph"], by])
    print(tables.render(["#", "task", "kind", "revision", "graph", "produced by"], rows))
    bad = []
    for v in b.versions():
        try:
            Bundle.open(args.bundle, version=v, trust=None)
        except EdgeclError as e:
            bad.append(f"version {v}: {e}")
    print(f"retained versions: {', '.join(map(str, b.versions()))}" + ("" if not bad else " — broken:"))
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


def cmd_log(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle import Bundle

    b = Bundle.open(args.bundle, verify=False, trust=None)
    rows = []
    for e in b.log:
        sup = "; ".join(f"{s['task']} r{s['revision']} -> r{s['by_revision']}"
                        for s in e.get("superseded", []))
        rows.append([e["version"], e.get("created_utc"), ", ".join(e.get("parts", [])) or "-",
                     sup or None, e.get("signer"), e.get("note")])
    if b.manifest.get("upgraded_from") == 1 or not rows:
        print(f"{args.bundle}: format-1 versions before the log began: {', '.join(map(str, b.versions()))}")
    print(tables.render(["version", "utc", "parts", "superseded", "signer", "note"], rows))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle_write import gc

    r = gc(args.bundle, keep=args.keep)
    print(f"{args.bundle}: kept versions {', '.join(map(str, r['kept_versions']))}; removed "
          f"{len(r['removed_versions'])} version(s) and {len(r['removed_files'])} file(s), "
          f"freed {r['freed_bytes']:,} bytes")
    for rel in r["removed_files"]:
        print(f"  removed {rel}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle_write import rollback

    v = rollback(args.bundle, args.to, key=_key(args))
    print(f"{args.bundle}: version {v} restores version {args.to}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle_write import Transaction

    with Transaction(args.bundle, key=_key(args), note="signed") as tx:
        if tx.key is None:
            raise EdgeclError("edgecl sign needs --key KEY (or EDGECL_SIGNING_KEY)")
        if tx.is_new:
            raise EdgeclError(f"{args.bundle}: no bundle here")
    print(f"{args.bundle}: version {tx.version}, signed by key {tx.key.key_id}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle_write import migrate

    v = migrate(args.bundle, key=_key(args))
    print(f"{args.bundle}: version {v} is format 2 (the earlier versions stay readable)")
    return 0


def _key(args: argparse.Namespace):
    return args.key if getattr(args, "key", None) else "env"


def add_key_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", help="Ed25519 signing key ('edgecl keygen'); default $EDGECL_SIGNING_KEY")


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-store", metavar="DIR",
                   help="directory of trusted *.pub keys: refuse unsigned, wrongly signed or replayed "
                        "bundles (default $EDGECL_TRUST_STORE)")


def add_parser(sub) -> None:
    v = sub.add_parser("verify", help="check a bundle: hashes, signature, every task through its kind")
    v.add_argument("bundle")
    add_trust_argument(v)
    v.add_argument("--allow-rollback", action="store_true",
                   help="accept a version older than the newest this device has seen")
    v.set_defaults(func=cmd_verify)

    lg = sub.add_parser("log", help="the version log: what each version added, replaced, who signed")
    lg.add_argument("bundle")
    lg.set_defaults(func=cmd_log)

    g = sub.add_parser("gc", help="retire all but the last N versions and delete unreferenced files")
    g.add_argument("bundle")
    g.add_argument("--keep", type=int, default=5, help="versions to keep (default 5; the current always)")
    g.set_defaults(func=cmd_gc)

    r = sub.add_parser("rollback", help="a new version with the contents of an earlier one")
    r.add_argument("bundle")
    r.add_argument("--to", type=int, required=True, help="the version to restore")
    add_key_argument(r)
    r.set_defaults(func=cmd_rollback)

    s = sub.add_parser("sign", help="sign a bundle's current contents as a new version")
    s.add_argument("bundle")
    add_key_argument(s)
    s.set_defaults(func=cmd_sign)

    m = sub.add_parser("migrate", help="write a format-1 bundle's current version as format 2")
    m.add_argument("bundle")
    add_key_argument(m)
    m.set_defaults(func=cmd_migrate)
