"""``greg report``: aggregate ``greg evaluate`` metrics over seeds into LaTeX/CSV tables, and draw figures.

Six sub-commands, each called by one Snakemake rule (workflow/rules/report.smk):

- ``greg report table --spec SPEC.json --tex OUT.tex --csv OUT.csv``: one paper table. The spec is a
  *resolved* table (every cell lists its ``metrics.csv`` files, one per seed, or says why it is n/a); the
  workflow builds it with :func:`greg.plan.resolve_table` from ``config/tables.yaml`` and the workflow config.
  With ``--paper config/paper_results.yaml`` the CSV gets the paper's value and ``delta`` per cell and
  ``--vs-paper-tex`` writes the table with both.
- ``greg report reproduction TABLE.csv ... --md OUT.md --csv OUT.csv [--aliased]``: per table, the cells
  reproduced within ``greg.reproduction.TOLERANCE`` of the paper, those off (and off where the recipe rests on
  an assumption), the worst cells and the missing runs.
- ``greg report fig3 --run LABEL=metrics.jsonl[,metrics.jsonl...] ... --out fig3.pdf``: energy loss and
  mean input-gradient norm of the score during training (keys ``energy`` and ``score_grad_norm``).
- ``greg report fig4 --model LABEL=EVAL_DIR[,EVAL_DIR...] ... --ood SET --out fig4.pdf``: energy-score
  histograms, ID vs one OOD set, from the per-sample scores ``EVAL_DIR/scores/{id,SET}.npz``.
- ``greg report fig-sam --model LABEL=final.pt ... --id D --ood A,B --out fig_sam.pdf [--npz OUT.npz]``: the
  SAM appendix's diagnostics (``greg.diagnostics``): per model (rows; the first is "before fine-tuning"),
  per-sample head-gradient norm, max logit and energy distributions, ID vs each OOD set.
- ``greg report grad-norm --model LABEL=final.pt[,final.pt...] ... --id D [--aux A] --ood X,Y --csv OUT.csv
  --out fig.pdf``: mean input-gradient norm of the energy score per set and model, mean ± std over seeds
  (what GReg's gradient term penalizes; the CPU demo's mechanism figure).

The work is done by ``greg.tables`` (aggregation over seeds, LaTeX/CSV), ``greg.paper_compare``,
``greg.reproduction`` and ``greg.figures``; this module is the command line only. A ``--template`` is
rendered in Jinja's sandbox (``greg.latex``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from greg import io
from greg.cli import DEVICE_HELP
from greg.errors import ReportError, cli_errors, json_object
from greg.figures import (
    SAM_DIAGNOSTICS,
    collect_fig_sam,
    plot_fig3,
    plot_fig4,
    plot_fig_sam,
    save_fig_sam_npz,
)
from greg.paper_compare import attach_paper, load_paper_results, render_tex_vs_paper
from greg.reproduction import read_table_csv, reproduction_summary
from greg.tables import DEFAULT_TEMPLATE, build_table, check_spec, render_csv, render_tex


def _label_files(items: list[str], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ReportError(f"{what} expects LABEL=PATH[,PATH...], got {item!r}")
        label, paths = item.split("=", 1)
        if not label:
            raise ReportError(f"{what} {item!r}: empty LABEL")
        out.setdefault(label, []).extend(p for p in paths.split(",") if p)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``greg report`` subcommands and flags; long because it is a flat declaration (one call per flag)."""
    sub = p.add_subparsers(dest="report_command", metavar="WHAT")
    sub.required = True
    t = sub.add_parser("table", help="aggregate metrics.csv files over seeds into OUT.tex and OUT.csv")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="resolved table spec (JSON file, see greg.plan.resolve_table)")
    src.add_argument("--spec-json", help="the resolved table spec as a JSON string")
    t.add_argument("--tex", required=True, help="LaTeX output")
    t.add_argument("--csv", required=True, help="CSV output (same numbers, long format)")
    t.add_argument("--template", default=None, help="jinja2 LaTeX template, rendered in Jinja's sandbox (default: "
                                                    "greg/templates/table.tex.j2, shipped with the package)")
    t.add_argument("--paper", default=None, help="the paper's numbers (config/paper_results.yaml): adds the "
                                                 "paper / delta CSV columns")
    t.add_argument("--aliases-json", default="{}", help="the workflow config's aliases (JSON), to map aliased "
                                                        "OOD sets back to the paper's")
    t.add_argument("--vs-paper-tex", default=None, help="also write the table with the paper's value in each cell")
    rp = sub.add_parser("reproduction", help="per table: cells within tolerance of the paper, worst cells, "
                                             "missing runs (from tables rendered with --paper)")
    rp.add_argument("csvs", nargs="+", metavar="TABLE.csv", help="tables' CSVs; the table name is the file stem")
    rp.add_argument("--md", required=True, help="Markdown output")
    rp.add_argument("--csv", required=True, help="CSV output (one line per table)")
    rp.add_argument("--aliased", action="store_true", help="the config substitutes datasets (smoke run, "
                    "rehearsal): say that deltas are meaningless")
    f3 = sub.add_parser("fig3", help="energy loss and input-gradient norm during training")
    f3.add_argument("--run", action="append", required=True, metavar="LABEL=JSONL[,JSONL...]",
                    help="a curve: its label and the metrics.jsonl of each seed")
    f3.add_argument("--smooth", type=int, default=None, help="moving-average window in logged points")
    f3.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    f4 = sub.add_parser("fig4", help="energy-score histograms, ID vs one OOD set")
    f4.add_argument("--model", action="append", required=True, metavar="LABEL=EVAL_DIR[,EVAL_DIR...]",
                    help="a panel: its label and the evaluation directory of each seed (with scores/)")
    f4.add_argument("--ood", required=True, help="OOD set name (scores/<ood>.npz)")
    f4.add_argument("--id-label", default="ID", help="legend name of the ID test set")
    f4.add_argument("--ood-label", default=None, help="legend name of the OOD set (default: its name)")
    f4.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    fs = sub.add_parser("fig-sam", help="SAM appendix diagnostics: head-gradient norm, max logit, scores, "
                                        "ID vs each OOD set, before/after fine-tuning (greg.diagnostics)")
    fs.add_argument("--model", action="append", required=True, metavar="LABEL=CHECKPOINT",
                    help="a row: its label and run checkpoint (final.pt); the first is the model before fine-tuning")
    fs.add_argument("--id", required=True, help="ID dataset (its test split)")
    fs.add_argument("--ood", required=True, help="comma-separated OOD sets (test splits)")
    fs.add_argument("--root", default="data", help="data root (default: data)")
    fs.add_argument("--device", default="auto", help=DEVICE_HELP)
    fs.add_argument("--max-samples", type=int, default=2000, help="subsample of each set (0 = all)")
    fs.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    fs.add_argument("--keys", default="head_grad_norm,max_logit,energy",
                    help=f"comma-separated columns among {', '.join(SAM_DIAGNOSTICS)}")
    fs.add_argument("--labels-json", default="{}", help="JSON object: set name -> display name")
    fs.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    fs.add_argument("--npz", default=None, help="also write every per-sample array to this .npz")
    gn = sub.add_parser("grad-norm", help="mean input-gradient norm of a score per set (ID, auxiliary, each "
                                          "OOD set), per model over seeds: bars + CSV (greg.diagnostics)")
    gn.add_argument("--model", action="append", required=True, metavar="LABEL=CHECKPOINT[,CHECKPOINT...]",
                    help="a bar colour: its label and the final.pt of each seed")
    gn.add_argument("--id", required=True, help="ID dataset: its test split, and the normalization of every set")
    gn.add_argument("--aux", default=None, help="auxiliary outlier set (its train split)")
    gn.add_argument("--ood", required=True, help="comma-separated OOD sets (test splits)")
    gn.add_argument("--score", default="energy", help="score whose input gradient is measured (greg.scores)")
    gn.add_argument("--root", default="data", help="data root (default: data)")
    gn.add_argument("--device", default="auto", help=DEVICE_HELP)
    gn.add_argument("--max-samples", type=int, default=2000, help="subsample of each set (0 = all)")
    gn.add_argument("--labels-json", default="{}", help="JSON object: set name -> display name")
    gn.add_argument("--csv", required=True, help="CSV output: model, set, role (id/aux/ood), n_seeds, mean, std")
    gn.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")


def _fig_sam(args: argparse.Namespace) -> list[Path]:
    models: dict[str, str] = {}
    for item in args.model:
        if "=" not in item:
            raise ReportError(f"--model expects LABEL=CHECKPOINT, got {item!r}")
        label, ckpt = item.split("=", 1)
        if label in models:
            raise ReportError(f"--model: label {label!r} given twice")
        models[label] = ckpt
    keys = tuple(k for k in args.keys.split(",") if k)
    bad = [k for k in keys if k not in SAM_DIAGNOSTICS]
    if bad or not keys:
        raise ReportError(f"--keys: unknown {bad or 'empty'}; known: {', '.join(SAM_DIAGNOSTICS)}")
    labels = _json_object(args.labels_json, "--labels-json")
    from greg.device import resolve_device  # on use: it imports torch

    diags = collect_fig_sam(models, args.id, [o for o in args.ood.split(",") if o], args.root,
                            str(resolve_device(args.device)), args.max_samples or None, args.batch_size)
    if args.npz:
        save_fig_sam_npz(args.npz, diags)
    return plot_fig_sam(diags, args.out, keys, labels)


def _spec(args: argparse.Namespace) -> dict:
    """The resolved table spec of ``--spec`` / ``--spec-json``, checked (``greg.tables.check_spec``)."""
    origin = "--spec-json" if args.spec_json else f"--spec {args.spec}"
    text = args.spec_json if args.spec_json else Path(args.spec).read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{origin}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return check_spec(spec, origin)


def _json_object(text: str, flag: str) -> dict:
    return json_object(text, flag, ReportError)


def _grad_norm(args: argparse.Namespace) -> list[Path]:
    from greg import diagnostics  # on use: it imports torch
    from greg.device import resolve_device

    labels = _json_object(args.labels_json, "--labels-json")
    sets = {args.id: (args.id, "test", "id")}
    if args.aux:
        sets[args.aux] = (args.aux, "train", "aux")
    sets.update({o: (o, "test", "ood") for o in args.ood.split(",") if o})
    roles = {labels.get(k, k): role for k, (_, _, role) in sets.items()}
    sets = {labels.get(k, k): (name, split) for k, (name, split, _) in sets.items()}
    device = str(resolve_device(args.device))
    per_model = {
        label: [diagnostics.grad_norms_checkpoint(c, sets, args.id, args.root, device, score=args.score,
                                                  max_samples=args.max_samples or None) for c in ckpts]
        for label, ckpts in _label_files(args.model, "--model").items()
    }
    rows = diagnostics.grad_norm_rows(per_model, roles)
    io.atomic_write_text(args.csv, diagnostics.format_grad_norm_csv(rows))
    return [Path(args.csv), *diagnostics.plot_grad_norms(rows, args.out, args.score)]


def run(args: argparse.Namespace) -> int:
    # one line per error; exit 2 for bad input (ReportError, a missing input file), 1 for I/O
    with cli_errors("greg report") as ce:
        if args.report_command == "table":
            spec = _spec(args)
            if args.paper:
                aliases = _json_object(args.aliases_json, "--aliases-json")
                spec = attach_paper(spec, load_paper_results(args.paper), aliases)
            table = build_table(spec)
            io.atomic_write_text(args.tex, render_tex(table, args.template or DEFAULT_TEMPLATE))
            io.atomic_write_text(args.csv, render_csv(table))
            if args.vs_paper_tex:
                io.atomic_write_text(args.vs_paper_tex, render_tex_vs_paper(table, args.template or DEFAULT_TEMPLATE))
            na = sum(v.mean is None for _, _, vals in table.rows for v in vals)
            print(f"{args.tex}: {len(table.rows)} rows x {len(table.columns)} columns ({na} n/a cells)",
                  file=sys.stderr)
        elif args.report_command == "reproduction":
            tables = {}
            for path in map(Path, args.csvs):
                tables[path.stem] = read_table_csv(path) if path.is_file() else None
            md, out = reproduction_summary(tables, aliased=args.aliased)
            io.atomic_write_text(args.md, md)
            io.atomic_write_text(args.csv, out)
            print(f"{args.md}: {len(tables)} tables", file=sys.stderr)
        elif args.report_command == "fig3":
            for p in plot_fig3(_label_files(args.run, "--run"), args.out, smooth_window=args.smooth):
                print(f"wrote {p}", file=sys.stderr)
        elif args.report_command == "fig4":
            paths = plot_fig4(_label_files(args.model, "--model"), args.ood, args.out, args.id_label,
                              args.ood_label)
            for p in paths:
                print(f"wrote {p}", file=sys.stderr)
        elif args.report_command == "fig-sam":
            for p in _fig_sam(args):
                print(f"wrote {p}", file=sys.stderr)
        elif args.report_command == "grad-norm":
            for p in _grad_norm(args):
                print(f"wrote {p}", file=sys.stderr)
    return ce.code
