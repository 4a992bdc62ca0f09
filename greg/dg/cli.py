"""``greg dg run`` (train restarts, resumable) and ``greg dg table`` (LaTeX + CSV of test accuracy).

    greg dg run --dataset colored_digits --algorithm hgp --restarts 10 --out DIR [--steps N]
                [--device auto|cpu|cuda] [--seed S] [--hparams-seed K] [--set key=value ...]
    greg dg table --inputs DIR1 DIR2 ... --out results/tables/dg_colored_digits.tex
    greg dg download --dataset colored_mnist [--data-root data]   (fetch MNIST ahead of `run`)

``run`` writes ``DIR/config.json`` (first), ``DIR/results.csv`` (one row per restart, rewritten after
each restart) and ``DIR/summary.json`` (mean / std / stderr; ``complete`` once all restarts are in).
Re-running skips the restarts already in ``results.csv``; a changed config is refused.
Errors are one line ``greg dg: <message>``; exit status 2 for bad input (arguments, a changed config, a
missing or malformed run directory), 1 for I/O failures (read-only or full disk, failed MNIST download),
see :mod:`greg.errors`.
``table`` groups the input runs by (dataset, algorithm), picks per group the run with the highest mean
training-domain validation accuracy (DomainBed's training-domain validation over hparam draws), and
renders mean ± std over restarts, the best non-oracle test accuracy in bold.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from greg import latex
from greg.config import SEED_MAX, int_flag, parse_set
from greg.device import DEVICE_HELP, resolve_device
from greg.errors import EXIT_INPUT, EXIT_STATUS_HELP, InputError, cli_errors, did_you_mean
from greg.io import LOCK_NAME, atomic_write_json, atomic_write_text, dir_lock, open_nofollow

RESULT_FIELDS = ["restart", "seed", "train_acc", "val_acc", "test_acc", "seconds"]
METRICS = ["train_acc", "val_acc", "test_acc"]
DISPLAY = {
    "erm": "ERM",
    "irm": "IRM",
    "vrex": "V-REx",
    "fishr": "Fishr",
    "coral": "CORAL",
    "hgp": "HGP",
    "hutchinson": "Hutchinson",
    "oracle": "Oracle (grayscale ERM)",
}
ORDER = list(DISPLAY)
# Names as registered in greg.dg.datasets (not imported here: it pulls torch into `greg dg --help`).
DATASET_HELP = "DG dataset: colored_digits, colored_digits_ls (no download), colored_mnist, colored_mnist_ls"
#: Defaults of ``greg dg run``; the workflow schema's ``dg:`` defaults and its ``data_root`` default must equal
#: them (a test reads the schema), so a workflow run and a run by hand agree.
RUN_DEFAULTS: dict[str, Any] = {"restarts": 10, "seed": 0, "hparams_seed": 0, "steps": None, "data_root": "data"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_STATUS_HELP
    sub = parser.add_subparsers(dest="dg_command", metavar="SUBCOMMAND")
    sub.required = True
    r = sub.add_parser(
        "run", help="train an algorithm for several restarts (resumable)", epilog=EXIT_STATUS_HELP
    )
    r.add_argument("--dataset", required=True, help=DATASET_HELP)
    r.add_argument("--algorithm", required=True, help=f"one of: {', '.join(ORDER)}")
    r.add_argument("--restarts", type=int_flag(1), default=RUN_DEFAULTS["restarts"],
                   help="independent restarts (seeds --seed, --seed + 1, ...); the table averages them")
    r.add_argument("--out", required=True, type=Path,
                   help="run directory (config.json, results.csv one row per restart, summary.json)")
    r.add_argument("--steps", type=int_flag(1), default=RUN_DEFAULTS["steps"], help="default: the dataset's protocol (501)")
    r.add_argument("--device", default="auto", help=DEVICE_HELP)
    r.add_argument("--seed", type=int_flag(0, SEED_MAX), default=RUN_DEFAULTS["seed"], help="restart r uses seed + r (data, init, draws)")
    r.add_argument("--hparams-seed", type=int_flag(0, SEED_MAX), default=RUN_DEFAULTS["hparams_seed"], help="0 = defaults, k > 0 = random draw k")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an hparam")
    r.add_argument("--data-root", default=RUN_DEFAULTS["data_root"], help="where MNIST is downloaded (colored_mnist)")
    r.add_argument("--progress", action="store_true", help="tqdm bar per restart")
    t = sub.add_parser("table", help="LaTeX + CSV table of several runs", epilog=EXIT_STATUS_HELP)
    t.add_argument("--inputs", nargs="+", required=True, type=Path, help="run directories of greg dg run")
    t.add_argument("--out", required=True, type=Path, help=".tex path; the .csv goes next to it")
    t.add_argument("--caption", default=None, help="caption, plain text (escaped for LaTeX); none: a standard caption")
    d = sub.add_parser(
        "download",
        help="fetch and check a dataset's files (MNIST for colored_mnist*; nothing for colored_digits*)",
        epilog=EXIT_STATUS_HELP,
    )
    d.add_argument("--dataset", required=True, help=DATASET_HELP)
    d.add_argument("--data-root", default=RUN_DEFAULTS["data_root"], help="where MNIST is downloaded (colored_mnist)")


@cli_errors("greg dg")
def run(args: argparse.Namespace) -> int:
    if args.dg_command == "download":
        return download_command(args)
    return run_command(args) if args.dg_command == "run" else table_command(args)


def download_command(args: argparse.Namespace) -> int:
    """Build the environments of restart 0 once: downloads and md5-checks what the dataset needs, so that
    `greg dg run` later needs no network (the workflow runs this on the submitting node)."""
    from greg.dg import datasets

    try:
        datasets.DG_DATASETS.get(args.dataset)
    except KeyError as e:
        raise InputError(e.args[0]) from None
    datasets.load(args.dataset, 0, args.data_root)
    print(f"[dg] {args.dataset}: data ready under {args.data_root}")
    return 0


# ------------------------------------------------------------------------------------------------ run
def _parse_set(items: list[str], hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` updated by ``--set KEY=VALUE`` items (greg.config.parse_set); a key must be a known hparam."""
    out = dict(hparams)
    try:
        sets = parse_set(items)
    except ValueError as e:
        raise InputError(str(e)) from None
    for key, value in sets.items():
        if key not in out:
            raise InputError(f"--set {key}: unknown hparam{did_you_mean(key, out)}; known: {', '.join(sorted(out))}")
        _check_hparam(key, value, out[key])
        out[key] = value
    return out


def _check_hparam(key: str, value: Any, default: Any) -> None:
    """``value`` must have the default's type (an int is a float; a bool is only a bool) and be finite."""
    if default is None:
        return
    want = type(default)
    ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise InputError(f"--set {key}={value!r}: expected a finite {want.__name__} (default {default!r}), "
                         f"got {type(value).__name__}")


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        missing = [k for k in RESULT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {RESULT_FIELDS}")
    return [{k: (int(v) if k in ("restart", "seed") else float(v)) for k, v in r.items()} for r in rows]


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in sorted(rows, key=lambda r: r["restart"]):
        w.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in RESULT_FIELDS})
    atomic_write_text(path, buf.getvalue())


def summarize(rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dataset": config["dataset"],
        "algorithm": config["algorithm"],
        "hparams": config["hparams"],
        "steps": config["steps"],
        "n_restarts": len(rows),
        "complete": len(rows) >= config["restarts"],
    }
    for m in METRICS:
        v = np.array([r[m] for r in rows], dtype=float)
        out[m] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=0)) if len(v) else math.nan,  # IRM script: np.std over restarts
            "stderr": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan,
        }
    return out


def run_command(args: argparse.Namespace) -> int:
    """Write ``config.json``, train the restarts not yet in ``results.csv`` (rewritten after each), then
    ``summary.json``; the whole run holds the directory's lock."""
    config = _run_config(args)
    # greg's lock marks the directory as its own: a non-empty one it did not make is refused (its files kept)
    _adopt_earlier_run(args.out, config)
    with dir_lock(args.out, "--out"):
        return _run_locked(args, config)


def _same_run(old: dict[str, Any], config: dict[str, Any]) -> bool:
    # more restarts extend a run; any other key makes it another run
    return {k: v for k, v in old.items() if k != "restarts"} == {k: v for k, v in config.items() if k != "restarts"}


def _adopt_earlier_run(out: Path, config: dict[str, Any]) -> None:
    """A run directory of a greg version that wrote no lock file is recognised by its ``config.json`` holding
    this very run's config, and marked as greg's so that it resumes; anything else is left to the lock's check."""
    cfg_path = out / "config.json"
    if not out.is_dir() or os.path.lexists(out / LOCK_NAME) or cfg_path.is_symlink() or not cfg_path.is_file():
        return
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(old, dict) and _same_run(old, config):
        with open_nofollow(out / LOCK_NAME, "a"):
            pass


def _run_locked(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from greg.dg import datasets
    from greg.dg.train import train_restart

    out: Path = args.out
    _write_config(out / "config.json", config)
    device = str(resolve_device(args.device))
    rows = [r for r in read_results(out / "results.csv") if r["restart"] < args.restarts]
    done = {r["restart"] for r in rows}
    for restart in range(args.restarts):
        if restart in done:
            continue
        seed = args.seed + restart
        envs = datasets.load(args.dataset, seed, args.data_root)
        row = train_restart(
            args.algorithm, envs, config["hparams"], config["steps"], seed, device=device, progress=args.progress
        )
        row.update({"restart": restart, "seed": seed})
        rows.append(row)
        write_results(out / "results.csv", rows)
        print(
            f"[dg] {args.algorithm} restart {restart}: train {row['train_acc']:.2f} "
            f"val {row['val_acc']:.2f} test {row['test_acc']:.2f} ({row['seconds']:.1f}s)",
            flush=True,
        )
    write_results(out / "results.csv", rows)
    summary = summarize(rows, config)
    atomic_write_json(out / "summary.json", summary)
    print(
        f"[dg] {args.algorithm} on {args.dataset}: test {summary['test_acc']['mean']:.2f} "
        f"± {summary['test_acc']['std']:.2f} over {len(rows)} restarts -> {out}"
    )
    return 0


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's ``config.json`` from the arguments: names checked (one line with the known ones), hparams
    (defaults or draw ``--hparams-seed``, then ``--set``), steps (``--steps`` or the dataset's protocol)."""
    from greg.dg import datasets, hparams_registry
    from greg.dg.algorithms import DG_ALGORITHMS

    try:  # fail early with the list of known names
        DG_ALGORITHMS.get(args.algorithm)
        datasets.DG_DATASETS.get(args.dataset)
    except KeyError as e:
        raise InputError(e.args[0]) from None
    hparams = _parse_set(
        args.set, hparams_registry.get_hparams(args.algorithm, args.dataset, args.hparams_seed)
    )
    steps = args.steps if args.steps is not None else datasets.DEFAULT_STEPS.get(args.dataset, 501)
    return {
        "dataset": args.dataset,
        "algorithm": args.algorithm,
        "hparams": hparams,
        "hparams_seed": args.hparams_seed,
        "steps": steps,
        "seed": args.seed,
        "restarts": args.restarts,
    }


def _write_config(cfg_path: Path, config: dict[str, Any]) -> None:
    """Write ``config.json``; an existing one that differs in more than ``restarts`` is refused (exit 2)."""
    if cfg_path.is_file():
        old = _json_object(cfg_path)
        if not _same_run(old, config):
            # a SystemExit, as before (tests/test_dg.py expects one), with the same line and code as InputError
            print(
                f"greg dg: {cfg_path}: existing run has a different config; use another --out.\n"
                f"  existing: {old}\n  new:      {config}",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_INPUT)
    atomic_write_json(cfg_path, config)


# ---------------------------------------------------------------------------------------------- table
def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a run's config.json / summary.json); else one line naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_run(path: Path) -> dict[str, Any]:
    summ, res = path / "summary.json", path / "results.csv"
    if not summ.is_file():
        raise FileNotFoundError(f"{summ} not found: run `greg dg run ... --out {path}` first")
    s = _json_object(summ)
    for k in ("dataset", "algorithm", *METRICS):
        if k not in s:
            raise KeyError(f"{summ}: missing key {k!r}")
    for k in ("dataset", "algorithm"):
        if not isinstance(s[k], str):
            raise InputError(f"{summ}: {k} is {s[k]!r}, not a name")
    for m in METRICS:
        if not isinstance(s[m], dict) or not all(k in s[m] for k in ("mean", "std")):
            raise InputError(f"{summ}: {m} must be an object with 'mean' and 'std'")
    s["path"] = str(path)
    s["rows"] = read_results(res)
    return s


def select_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (dataset, algorithm): the highest mean training-domain validation accuracy (a NaN one
    never wins; ties go to the first path in sorted order, so the choice does not depend on the input order)."""
    def val(r: dict[str, Any]) -> float:
        v = r["val_acc"]["mean"]
        return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(runs, key=lambda r: r["path"]):
        key = (r["dataset"], r["algorithm"])
        if key not in best or val(r) > val(best[key]):
            best[key] = r
    rank = lambda a: ORDER.index(a) if a in ORDER else len(ORDER)
    return sorted(best.values(), key=lambda r: (r["dataset"], rank(r["algorithm"]), r["algorithm"]))


# display names of the DG datasets in tables (greg.dg.datasets)
DATASET_DISPLAY = {
    "colored_mnist": "Colored MNIST",
    "colored_mnist_ls": "Colored MNIST (label shift)",
    "colored_digits": "Colored Digits",
    "colored_digits_ls": "Colored Digits (label shift)",
}


def render_table(runs: list[dict[str, Any]], caption: str | None = None) -> tuple[str, str]:
    """Return ``(latex, csv)`` in the style of ``greg report table`` (booktabs, ``mean{\\scriptsize$\\pm$std}``,
    a ``\\label``); bold = best mean test accuracy (one decimal, as shown) among the non-oracle rows of each
    dataset, none when they all tie."""
    shown: dict[str, set[float]] = {}
    for r in runs:
        if r["algorithm"] != "oracle" and _finite(r["test_acc"]["mean"]):
            shown.setdefault(r["dataset"], set()).add(round(r["test_acc"]["mean"], 1))
    best_test = {d: max(v) for d, v in shown.items() if len(v) > 1}
    cols = ["Train acc.", "Val. acc.", "Test acc."]
    caption = caption or ("Domain generalization: training-, validation- and test-environment accuracy (%), "
                          "mean ± std over restarts, the best hyper-parameters by validation accuracy. Best "
                          "test accuracy (oracle excluded) in bold.")
    lines = [
        "% table_dg: generated by `greg dg table`; do not edit by hand.",
        "% Needs: \\usepackage{booktabs} (rules)",
        "\\begin{table}[t]",
        "\\centering",
        "\\caption{" + latex.escape(caption) + "}",
        "\\label{tab:table_dg}",
        "\\begin{tabular}{ll" + "c" * len(cols) + "}",
        "\\toprule",
        "Dataset & Algorithm & " + " & ".join(cols) + " \\\\",
        "\\midrule",
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["dataset", "algorithm", "n_restarts"]
        + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
        + ["path"]
    )
    for r in runs:
        cells = []
        for m in METRICS:
            mean, std = r[m]["mean"], r[m]["std"]
            if not _finite(mean):  # a NaN result is flagged, never shown as a number (table_command warns)
                cells.append("n/a")
                continue
            text = f"{mean:.1f}"
            if m == "test_acc" and r["algorithm"] != "oracle" and round(mean, 1) == best_test.get(r["dataset"]):
                text = f"\\textbf{{{text}}}"
            cells.append(text + f"{{\\scriptsize$\\pm${std:.1f}}}")
        name = latex.escape(DISPLAY.get(r["algorithm"], r["algorithm"]))
        dataset = latex.escape(DATASET_DISPLAY.get(r["dataset"], r["dataset"]))
        lines.append(f"{dataset} & {name} & " + " & ".join(cells) + " \\\\")
        w.writerow(
            [r["dataset"], r["algorithm"], r["n_restarts"]]
            + [f"{r[m][s]:.4f}" for m in METRICS for s in ("mean", "std")]
            + [r["path"]]
        )
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n", buf.getvalue()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def table_command(args: argparse.Namespace) -> int:
    runs = select_runs([load_run(p) for p in args.inputs])
    for r in runs:
        bad = [m for m in METRICS if not _finite(r[m]["mean"])]
        if bad:
            print(f"greg dg: warning: {r['path']}: {', '.join(bad)} not a finite number; shown as n/a",
                  file=sys.stderr)
    tex, csv_text = render_table(runs, args.caption)
    atomic_write_text(args.out, tex)
    atomic_write_text(args.out.with_suffix(".csv"), csv_text)
    print(f"[dg] table with {len(runs)} rows -> {args.out} (+ .csv)")
    return 0
