"""``edgecl daemon``: serve a bundle over a local socket, take samples, learn on a trigger.

Wired by the CLI: ``add_parser(sub)`` registers the command; it runs until SIGTERM or
SIGINT (exit 0), 2 on a configuration or bundle error. The web stack (the ``daemon``
extra) is imported only when the daemon starts. See docs/daemon.md.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    from edgecl.runtime.daemon.service import add_arguments

    p = sub.add_parser("daemon", help="serve inference, take labelled samples and learn new tasks on the "
                                      "device (HTTP over a Unix socket; docs/daemon.md)",
                       description="Serve BUNDLE over a Unix socket (or loopback TCP with a token): /infer, "
                                   "/samples, /learn, /status, /metrics, /rollback, /healthz, /readyz.")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.daemon.service import run_args

    return run_args(args)
