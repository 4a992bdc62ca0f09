"""``greg data list | download NAME... [--root DIR] [--mirror DIR] [--url-base URL] [--checksums FILE]
[--accept-checksum NAME=DIGEST] [--read-timeout S] [--min-rate B] | verify NAME... [--root DIR] | fake --root DIR``.

Every named dataset is tried; each failure is one line ``greg data: <message>`` (naming the file, the
expected and actual digests, or the command to run). Exit status (:data:`EXIT_HELP`): 0 when every dataset
is fine, 1 when any failed -- like ``md5sum -c``, a failed check is this command's answer rather than a
usage error (argparse's usage errors exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from greg.data import downloader as dl
from greg.data.base import ROLES, names, spec
from greg.errors import CAUGHT, EXIT_INPUT, InputError, error_text

EXIT_HELP = (
    "exit status: 0 every dataset OK; 1 any dataset failed (missing, checksum mismatch, truncated, download "
    "failed, manual placement needed, unknown name), one line each; 2 usage error or invalid flag value."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``greg data`` subcommands and flags; long because it is a flat declaration (one call per flag)."""
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
    p.add_argument(
        "--checksums",
        metavar="FILE",
        help="verify against the digests of FILE (sha256sum/md5sum format: '<hex>  <file name>'; names as file "
        "name, path under the dataset directory, or <dir>/<name>) instead of the published ones, e.g. for "
        f"stand-in files served with --url-base; each use is a warning, recorded in .complete (also ${dl.CHECKSUMS_ENV})",
    )
    p.add_argument(
        "--accept-checksum",
        action="append",
        default=[],
        metavar="NAME=DIGEST",
        help="accept DIGEST (md5:<hex>, sha256:<hex> or bare hex) for the file NAME (or the dataset NAME with "
        "one file) when its published checksum is known to be wrong; printed as a warning and recorded in "
        ".complete; repeatable",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=dl.READ_TIMEOUT,
        metavar="S",
        help=f"abandon a transfer when no byte arrives for S seconds (default {dl.READ_TIMEOUT:g}); the .part is "
        "kept and the next run resumes it",
    )
    p.add_argument(
        "--min-rate",
        type=float,
        default=dl.MIN_RATE,
        metavar="B",
        help=f"abandon a transfer slower than B bytes/s over any --read-timeout window (default {dl.MIN_RATE:g}; "
        "0: no minimum); the .part is kept",
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
    p = sub.add_parser(
        "fake",
        help="write format-faithful fakes of every dataset (few images) to rehearse the workflow",
        description="Writes DIR/serve/ (one file per catalog download, real file names, archive layouts, "
        "schemas, image sizes and modes, few images; and checksums.json, their digests) and DIR/data/ "
        "(the hand-placed ImageNet folders and torchvision DenseNet-121 weights). Serve DIR/serve over HTTP "
        "and download with --url-base and --checksums DIR/serve/checksums.json (docs/WORKFLOW.md, "
        "rehearsal).",
    )
    p.add_argument("--root", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the fake contents (default: 0)")
    p.add_argument("--no-imagenet", action="store_true", help="skip the ImageNet folders (2000+ JPEGs)")


def _fake(args: argparse.Namespace) -> int:
    from greg.data.fake import write_fakes

    print(f"fake: checksums in {write_fakes(args.root, seed=args.seed, imagenet=not args.no_imagenet)}")
    return 0


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


def _download_options(args: argparse.Namespace) -> dict:
    """The checked download flags as :func:`greg.data.downloader.download` keywords; ``InputError`` (one line
    naming the flag and what is allowed) otherwise."""
    import math

    for flag, v, low in (("--read-timeout", args.read_timeout, "> 0"), ("--min-rate", args.min_rate, ">= 0")):
        if not math.isfinite(v) or (v <= 0 if low == "> 0" else v < 0):
            raise InputError(f"{flag} {v:g}: allowed: a finite number {low}")
    accept: dict[str, str] = {}
    known: set[str] = set()
    for n in args.names:
        with contextlib.suppress(KeyError):
            s = spec(n)
            rels = [r.filename for r in s.resources] + list(s.file_checksums)
            known |= {*rels, *(f"{s.directory}/{r}" for r in rels)}
            if len(s.resources) == 1:
                known.add(s.name)
    for item in args.accept_checksum:
        name, sep, digest = item.partition("=")
        if not sep or not name:
            raise InputError(f"--accept-checksum {item!r}: allowed: NAME=DIGEST")
        if name not in known:
            raise InputError(
                f"--accept-checksum {item!r}: {name!r} is no file of the named datasets; allowed: "
                f"{', '.join(sorted(known)) or '(none)'}"
            )
        try:
            accept[name] = dl.parse_digest(digest, f"--accept-checksum {name}")
        except ValueError as e:
            raise InputError(str(e)) from e
    if args.checksums:
        try:
            dl.read_checksums_file(args.checksums)  # checked once, before any download
        except (OSError, ValueError) as e:
            raise InputError(f"--checksums {args.checksums}: {error_text(e)}") from e
    return {
        "url_base": args.url_base,
        "mirror": args.mirror,
        "progress": not args.no_progress,
        "force": args.force,
        "checksums": args.checksums,
        "accept": accept,
        "read_timeout": args.read_timeout,
        "min_rate": args.min_rate,
    }


def run(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        return _list(args)
    if args.data_command == "fake":
        return _fake(args)
    if args.data_command == "download":
        try:
            options = _download_options(args)
        except InputError as e:
            print(f"greg data: {e}", file=sys.stderr)
            return EXIT_INPUT
    failed = 0
    for name in args.names:
        try:
            if args.data_command == "download":
                dl.download(name, args.root, **options)
            else:
                for line in dl.verify(name, args.root):
                    print(f"{name}: {line}" if not line.startswith(name) else line)
                print(f"{name}: OK")
        except CAUGHT as e:
            print(f"greg data: {error_text(e)}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
