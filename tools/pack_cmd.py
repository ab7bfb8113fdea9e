"""``edgecl pack`` / ``edgecl unpack``: between a bundle directory and its one-file form.

    edgecl pack BUNDLE_DIR OUT_FILE [--alignment N] [--force]
    edgecl unpack FILE OUT_DIR

The packed file (docs/bundle-file.md) is what the runtime maps directly; it is read-only,
so a commit goes unpack -> commit -> pack. Errors are ``EdgeclError``s (a ``BundleError``
naming the file): ``edgecl``'s ``main`` prints them and exits 2.
"""

from __future__ import annotations

import argparse


def _alignment(value: str) -> int:
    from edgecl.runtime.packfile import check_alignment

    try:
        n = int(value)
        check_alignment(n)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "alignment" in str(e) else
                                         f"{value!r} is not an integer") from None
    return n


def cmd_pack(args: argparse.Namespace) -> int:
    from edgecl.runtime.packfile import pack

    r = pack(args.bundle_dir, args.out_file, alignment=args.alignment, overwrite=args.force)
    print(f"{r['path']}: {r['files']} file(s) from {args.bundle_dir}, {r['bytes']:,} bytes "
          f"({r['data_bytes']:,} of data, {r['padding']:,} of padding to {r['alignment']}-byte alignment)")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from edgecl.runtime.packfile import unpack

    r = unpack(args.file, args.out_dir)
    if r["written"]:
        print(f"{r['path']}: wrote {r['written']} of {r['files']} file(s) from {args.file}, "
              f"{r['bytes']:,} bytes in all")
    else:
        print(f"{r['path']}: already holds the {r['files']} file(s) of {args.file}; nothing written")
    return 0


def add_parser(sub) -> None:
    """Register ``pack`` and ``unpack`` on ``edgecl``'s subparsers object."""
    from edgecl.runtime.packfile import DEFAULT_ALIGNMENT

    p = sub.add_parser("pack", help="write a bundle directory as one aligned, mmap-able file")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    p.add_argument("out_file", metavar="OUT_FILE", help="the packed bundle to write (atomically)")
    p.add_argument("--alignment", type=_alignment, default=DEFAULT_ALIGNMENT, metavar="N",
                   help=f"byte alignment of every file, a power of two >= 64 (default {DEFAULT_ALIGNMENT}: "
                        "the page size, so a tensor's pages load only when used)")
    p.add_argument("--force", action="store_true", help="replace OUT_FILE if it exists")
    p.set_defaults(func=cmd_pack)

    u = sub.add_parser("unpack", help="recreate a bundle directory from a packed bundle file")
    u.add_argument("file", metavar="FILE")
    u.add_argument("out_dir", metavar="OUT_DIR",
                   help="new or empty directory (or one already holding the identical files)")
    u.set_defaults(func=cmd_unpack)
