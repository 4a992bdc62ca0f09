"""``greg train``: load and validate a run config (``greg.config``), then run ``greg.trainer.Trainer``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from greg.config import config_text, load_config
from greg.device import DEVICE_HELP
from greg.errors import EXIT_STATUS_HELP, cli_errors
from greg.trainer import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError, Trainer

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
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = (
        f"{EXIT_STATUS_HELP} Also: {EXIT_NONFINITE} the loss or the weights became NaN/inf (the last good "
        f"checkpoint is kept); {EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after checkpointing (rerun the same "
        "command to resume). Every config key is documented in greg/config.py DEFAULTS (greg train "
        "--print-config shows the resolved config)."
    )


def run(args: argparse.Namespace) -> int:
    with cli_errors("greg train") as ce:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(config_text(cfg), end="")
            return 0
        try:
            return Trainer(cfg, args.out, args.device).run()
        except NonFiniteError as e:
            state = Path(args.out) / "state.pt"
            kept = (
                f"the last good checkpoint is kept in {state}"
                if state.exists()
                else "no checkpoint was written"
            )
            print(f"greg train: stopped: {e}; {kept}", file=sys.stderr)
            return EXIT_NONFINITE
    return ce.code
