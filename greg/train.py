"""``greg train``: load and validate a run config (``greg.config``), then run ``greg.trainer.Trainer``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from greg.cli import DEVICE_HELP
from greg.errors import EXIT_NUMERIC, EXIT_STATUS_HELP, InputError, cli_errors

# greg.config and greg.trainer (torch) are imported in run(): `greg train --help` and argument errors
# answer without them.

# --------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="YAML",
        help="run config; repeat to merge several, later files override earlier ones",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted path; VALUE parsed as YAML), e.g. --set seed=2",
    )
    p.add_argument(
        "--out", required=True, help="run directory (final.pt, state.pt, metrics.jsonl, config.yaml)"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    # Runtime-only settings (greg.config.RUNTIME_KEYS): not part of what the run computes, so a rerun or a
    # resume may change them. Applied before --set (an explicit --set wins).
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data-loader worker processes (data.num_workers); the workflow passes its threads")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset root (data.root)")
    p.add_argument("--require-cuda", action="store_true",
                   help="fail (exit 1) instead of warning when CUDA is unavailable (the workflow passes it "
                   "for jobs that asked SLURM for a GPU)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--force", action="store_true",
                   help="start over: discard --out's final.pt and state.pt (e.g. of another config) and retrain")
    p.epilog = (
        f"{EXIT_STATUS_HELP} Every config key is declared in greg/config.py KEYS: default, allowed values, "
        "meaning (greg train --print-config shows the resolved config)."
    )


def run(args: argparse.Namespace) -> int:
    from greg.config import config_text, load_config
    from greg.device import check_cuda
    from greg.trainer import NonFiniteError, Trainer

    with cli_errors("greg train") as ce:
        runtime = []
        if args.workers is not None:
            if args.workers < 0:
                raise InputError(f"--workers {args.workers}: must be >= 0")
            runtime.append(f"data.num_workers={args.workers}")
        if args.data_root is not None:
            runtime.append(f"data.root={json.dumps(args.data_root)}")  # a JSON string is a YAML string
        cfg = load_config(args.config, runtime + args.set)
        if args.print_config:
            print(config_text(cfg), end="")
            return 0
        try:
            check_cuda(args.device, args.require_cuda, "greg train")
            return Trainer(cfg, args.out, args.device, force=args.force).run()
        except NonFiniteError as e:
            state = Path(args.out) / "state.pt"
            kept = (
                f"the last good checkpoint is kept in {state}"
                if state.exists()
                else "no checkpoint was written"
            )
            print(f"greg train: stopped: {e}; {kept}", file=sys.stderr)
            return EXIT_NUMERIC
    return ce.code
