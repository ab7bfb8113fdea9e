"""``edgecl keygen``: make an Ed25519 key pair for signing bundles.

Wired by the CLI with one line, ``keys_cmd.add_parser(sub)``; the command's ``func``
returns an exit code and user errors raise :class:`edgecl.runtime.signing.SigningError`
(an ``EdgeclError``, which the CLI prints). Device side: no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``keygen`` on the CLI's subparsers object."""
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (OUT private, "
                                      "OUT.pub public)")
    p.add_argument("out", type=Path, metavar="OUT",
                   help="private key file to create (PKCS8 PEM, mode 0600); the public key goes "
                        "next to it with the suffix .pub. Never overwrites.")
    p.add_argument("--name", help="a label for the public key, e.g. build-server (default: the key id)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.signing import generate_key, public_key_path

    out = Path(args.out)
    kid = generate_key(out, name=args.name)
    pub = public_key_path(out)
    print(f"key id {kid}: private key {out} (keep it secret), public key {pub}")
    print(f"put {pub} into the device's trust store directory (EDGECL_TRUST_STORE) to trust bundles "
          f"signed by it; sign with --key {out} or EDGECL_SIGNING_KEY={out}")
    return 0
