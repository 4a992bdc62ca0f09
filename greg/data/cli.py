"""``greg data list | download NAME... [--root DIR] [--mirror DIR] | verify NAME... [--root DIR]``.

Every named dataset is tried; each failure is one line ``greg data: <message>`` (naming the file, the
expected and actual digests, or the command to run). Exit status (:data:`EXIT_HELP`): 0 when every dataset
is fine, 1 when any failed -- like ``md5sum -c``, a failed check is this command's answer rather than a
usage error (argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from greg.data import downloader as dl
from greg.data.base import ROLES, names, spec
from greg.errors import CAUGHT, error_text

EXIT_HELP = (
    "exit status: 0 every dataset OK; 1 any dataset failed (missing, checksum mismatch, truncated, download "
    "failed, manual placement needed, unknown name), one line each; 2 usage error."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_HELP
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("list", help="list the registered datasets")
    p.add_argument("--role", choices=ROLES, help="only datasets with this role")
    p.add_argument("--root", type=Path, help="also show whether each dataset is present under DIR")
    p = sub.add_parser(
        "download", help="download, verify and extract datasets (a second run is a no-op)", epilog=EXIT_HELP
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--root", type=Path, default=Path("data"), help="data directory (default: data)")
    p.add_argument(
        "--mirror",
        metavar="DIR",
        help=f"take files from the local directory DIR (by file name) before any URL, checksums verified "
        f"as for a download (also ${dl.MIRROR_ENV})",
    )
    p.add_argument(
        "--url-base",
        help=f"fetch <URL_BASE>/<file name> instead of the public URLs (also ${dl.URL_BASE_ENV})",
    )
    p.add_argument("--force", action="store_true", help="redo the checks and extraction even if complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "verify",
        help="re-check checksums (kept files, extracted files) and layout of downloaded datasets",
        epilog=EXIT_HELP,
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--root", type=Path, default=Path("data"), help="data directory (default: data)")


def _list(args: argparse.Namespace) -> int:
    rows = [("name", "role", "classes", "size", "splits", "present" if args.root else "source")]
    for n in names(args.role):
        s = spec(n)
        splits = ", ".join(f"{k}:{s.sizes[k]}" if k in s.sizes else k for k in s.splits)
        if args.root:
            last = (
                "manual"
                if s.manual
                else ("generated" if not s.resources else str(dl.is_complete(s, args.root)))
            )
        else:
            last = s.source
        rows.append((n, s.role, str(s.num_classes), str(s.image_size), splits, last))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        return _list(args)
    failed = 0
    for name in args.names:
        try:
            if args.data_command == "download":
                dl.download(
                    name,
                    args.root,
                    url_base=args.url_base,
                    mirror=args.mirror,
                    progress=not args.no_progress,
                    force=args.force,
                )
            else:
                for line in dl.verify(name, args.root):
                    print(f"{name}: {line}" if not line.startswith(name) else line)
                print(f"{name}: OK")
        except CAUGHT as e:
            print(f"greg data: {error_text(e)}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
