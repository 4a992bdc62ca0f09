"""``greg report``: aggregate ``greg evaluate`` metrics over seeds into LaTeX/CSV tables, and draw figures.

Four sub-commands, each called by one Snakemake rule (workflow/rules/report.smk):

- ``greg report table --spec SPEC.json --tex OUT.tex --csv OUT.csv``: one paper table. The spec is a
  *resolved* table (every cell lists its ``metrics.csv`` files, one per seed, or says why it is n/a); the
  workflow builds it with :func:`resolve_table` from ``config/tables.yaml`` and the workflow config.
- ``greg report fig3 --run LABEL=metrics.jsonl[,metrics.jsonl...] ... --out fig3.pdf``: energy loss and
  mean input-gradient norm of the score during training (keys ``energy`` and ``score_grad_norm``).
- ``greg report fig4 --model LABEL=EVAL_DIR[,EVAL_DIR...] ... --ood SET --out fig4.pdf``: energy-score
  histograms, ID vs one OOD set, from the per-sample scores ``EVAL_DIR/scores/{id,SET}.npz``.
- ``greg report fig-sam --model LABEL=final.pt ... --id D --ood A,B --out fig_sam.pdf [--npz OUT.npz]``: the
  SAM appendix's diagnostics (``greg.diagnostics``): per model (rows; the first is "before fine-tuning"),
  per-sample head-gradient norm, max logit and energy distributions, ID vs each OOD set.

Aggregation: for each cell, the value of each seed's ``metrics.csv`` row (an OOD set, or ``mean``) is read;
the table shows the mean over seeds and the sample standard deviation (ddof=1; 0 with one seed). The best
mean of each column is bold and the runner-up underlined, compared on the displayed (rounded) values so
that ties are marked alike. Every table states its FPR95 convention (default: the paper's,
``fpr95_idpos``). Figures are written as PDF and PNG (same stem).
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from greg import io

# ------------------------------------------------------------------------------------------- metrics

# name -> (metrics.csv column or None for the FPR95 convention, higher is better, LaTeX header)
METRICS: dict[str, tuple[str | None, bool, str]] = {
    "fpr95": (None, False, r"FPR95$\downarrow$"),
    "auroc": ("auroc", True, r"AUROC$\uparrow$"),
    "aupr_in": ("aupr_in", True, r"AUPR-In$\uparrow$"),
    "aupr_out": ("aupr_out", True, r"AUPR-Out$\uparrow$"),
    "id_acc": ("id_acc", True, r"ID Acc.$\uparrow$"),
}
FPR_CONVENTIONS = {
    "fpr95_idpos": "FPR95 with ID as the positive class at 95\\% of ID samples accepted (paper convention)",
    "fpr95_oodpos": "FPR95 with OOD as the positive class at 95\\% OOD recall (OpenOOD v1.5 / pytorch-ood)",
}
CSV_COLUMNS = ("ood_set", "n_id", "n_ood", "id_acc", "fpr95_idpos", "fpr95_oodpos", "auroc", "aupr_in",
               "aupr_out")
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "workflow" / "templates" / "table.tex.j2"


class ReportError(ValueError):
    pass


def metric_column(metric: str, fpr: str) -> str:
    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if fpr not in FPR_CONVENTIONS:
        raise ReportError(f"unknown FPR95 convention {fpr!r}; known: {', '.join(FPR_CONVENTIONS)}")
    return METRICS[metric][0] or fpr


def read_metrics_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """``metrics.csv`` of ``greg evaluate`` -> ``{ood_set: {column: value}}`` (``mean`` included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}")
        out = {}
        for row in reader:
            out[row["ood_set"]] = {k: float(v) for k, v in row.items() if k != "ood_set" and v not in ("", None)}
    if "mean" not in out:
        raise ReportError(f"{path}: no 'mean' row")
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        raise ReportError("mean_std of no values")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ------------------------------------------------------------------------------ resolving table specs


def run_dir(results: str, dataset: str, arch: str, run: str, seed: int) -> str:
    """``results/<dataset>/<arch>/<run>/seed<seed>``: the readable id of one training run."""
    return f"{results}/{dataset}/{arch}/{run}/seed{seed}"


def eval_csv(results: str, dataset: str, arch: str, run: str, seed: int, detector: str) -> str:
    return f"{run_dir(results, dataset, arch, run, seed)}/eval/{detector}/metrics.csv"


def alias(config: dict, kind: str, name: str) -> str:
    """Map a name through ``config['aliases'][kind]`` (the smoke config maps cifar10 -> tiny, etc.)."""
    return (config.get("aliases") or {}).get(kind, {}).get(name, name)


def ood_sets(config: dict, dataset: str) -> list[str]:
    try:
        return list(config["datasets"][dataset]["ood"])
    except KeyError:
        raise ReportError(f"dataset {dataset!r} is not in the workflow config's 'datasets'") from None


def resolve_table(name: str, spec: dict, config: dict,
                  unavailable: Callable[[dict], str | None] = lambda cell: None) -> dict:
    """Turn one ``config/tables.yaml`` entry into a self-contained, JSON-able table spec.

    Each column group gives ``dataset``/``arch`` (aliased through ``config['aliases']``) and ``ood``: a list
    of OOD sets and/or ``mean``, or ``all`` (every OOD set of the dataset, then ``mean``), or ``mean``.
    Each row gives ``run`` (``pretrain`` or a variant of ``config['variants']``) and optionally ``detector``
    (default: the variant's detector), ``dataset``/``arch`` (override the group's). ``unavailable(cell)``
    returns a reason when the cell cannot be produced (method/detector/model/dataset not implemented):
    the cell is then ``na`` and lists no files.
    """
    results = config.get("results", "results")
    seeds = list(config["seeds"])
    fpr = spec.get("fpr", "fpr95_idpos")
    metrics = list(spec.get("metrics", ["fpr95", "auroc"]))
    for m in metrics:
        metric_column(m, fpr)
    labels = {**(config.get("labels") or {})}
    groups = []
    for g in spec["groups"]:
        dataset = alias(config, "dataset", g["dataset"])
        ood = g.get("ood", "all")
        if ood == "all":
            cols = ood_sets(config, dataset) + ["mean"]
        elif ood == "mean":
            cols = ["mean"]
        else:
            cols = [o if o == "mean" else alias(config, "ood", o) for o in ood]
            known = set(ood_sets(config, dataset))
            bad = [o for o in cols if o != "mean" and o not in known]
            if bad:
                raise ReportError(f"table {name}: OOD set(s) {bad} not among {dataset}'s {sorted(known)}")
        groups.append({
            "label": g.get("label", labels.get(dataset, dataset)),
            "dataset": dataset,
            "arch": alias(config, "arch", g["arch"]) if "arch" in g else None,
            "columns": [{"ood": o, "label": labels.get(o, "Average" if o == "mean" else o)} for o in cols],
        })
    variants = config.get("variants", {})
    rows = []
    for r in spec["rows"]:
        run = r["run"]
        if run != "pretrain" and run not in variants:
            raise ReportError(f"table {name}: row {r.get('label', run)!r}: run {run!r} is neither 'pretrain' "
                              f"nor a variant in the workflow config ({', '.join(sorted(variants))})")
        detector = r.get("detector") or (variants.get(run, {}).get("detector") if run != "pretrain" else None)
        if not detector:
            raise ReportError(f"table {name}: row {r.get('label', run)!r} needs a detector")
        cells = []
        for g in groups:
            dataset = alias(config, "dataset", r["dataset"]) if "dataset" in r else g["dataset"]
            arch = alias(config, "arch", r["arch"]) if "arch" in r else g["arch"]
            if arch is None:
                raise ReportError(f"table {name}: row {r.get('label', run)!r} has no arch (give it in the "
                                  "group or the row)")
            cell = {"dataset": dataset, "arch": arch, "run": run, "detector": detector}
            reason = unavailable(cell)
            cell["na"] = reason
            cell["files"] = [] if reason else [eval_csv(results, dataset, arch, run, s, detector) for s in seeds]
            cells.append(cell)
        rows.append({"label": r.get("label", run), "section": r.get("section"), "cells": cells})
    return {
        "name": name,
        "caption": spec.get("caption", name),
        "fpr": fpr,
        "fpr_note": FPR_CONVENTIONS[fpr],
        "metrics": metrics,
        "digits": int(spec.get("digits", 2)),
        "show_std": bool(spec.get("show_std", True)),
        "groups": groups,
        "rows": rows,
    }


def load_tables(path: str | Path) -> dict[str, dict]:
    """The ``tableN`` entries of ``config/tables.yaml`` (keys starting with ``_`` hold YAML anchors)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tables file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    tables = {k: v for k, v in data.items() if not str(k).startswith("_")}
    for k, v in tables.items():
        missing = [key for key in ("caption", "groups", "rows") if key not in (v or {})]
        if missing:
            raise ReportError(f"{path}: table {k!r} lacks {', '.join(missing)}")
    return tables


def run_spec(config: dict, run: str, dataset: str) -> dict:
    """The training recipe of ``run`` on ``dataset``: ``{configs, set, init}`` (``pretrain`` or a variant)."""
    if run == "pretrain":
        v, init = config["pretrain"], "scratch"
    else:
        if run not in config["variants"]:
            raise ReportError(f"unknown run {run!r}; variants: {', '.join(sorted(config['variants']))}")
        v = config["variants"][run]
        init = (v.get("init_by_dataset") or {}).get(dataset, v.get("init", "pretrain"))
    sets = {**(v.get("set") or {}), **((v.get("set_by_dataset") or {}).get(dataset) or {})}
    return {"configs": list(v["configs"]), "set": sets, "init": init}


def run_method(config: dict, run: str, dataset: str) -> str:
    """Method name a run trains with: the last ``method.name`` of its presets, unless ``set`` overrides it."""
    import yaml

    spec = run_spec(config, run, dataset)
    name = spec["set"].get("method.name")
    if name is None:
        for f in spec["configs"]:
            p = Path(f)
            if not p.is_file():
                raise FileNotFoundError(f"run {run!r}: preset {f} not found")
            name = ((yaml.safe_load(p.read_text()) or {}).get("method") or {}).get("name", name)
    return name or "ce"


def run_needs_aux(config: dict, run: str, dataset: str) -> bool:
    """Whether a run trains on auxiliary outliers (its method's ``needs_aux``; True when unknown, so that a
    method still being written gets its data). SAM fine-tuning makes its pseudo-OOD from the ID batch."""
    if run == "pretrain":
        return False
    try:
        from greg.methods import METHODS

        return bool(getattr(METHODS.get(run_method(config, run, dataset)), "needs_aux", True))
    except (ImportError, KeyError):
        return True


def yaml_value(v: Any) -> str:
    """A ``--set`` value that ``greg train`` parses back (YAML flow style, one line)."""
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def pretrain_import(config: dict, dataset: str, arch: str) -> str | None:
    """The external checkpoint that replaces CE training of (dataset, arch), or None: ``pretrain.import``."""
    by_arch = ((config.get("pretrain") or {}).get("import") or {}).get(dataset) or {}
    return by_arch.get(arch) or None


def train_args(config: dict, dataset: str, arch: str, run: str, seed: int | str) -> list[str]:
    """Arguments of ``greg train`` (without ``--out``) for one run; shell-quote them before use.

    ``pretrain`` of a pair listed in ``pretrain.import`` imports that file as the run checkpoint: 0 epochs
    (and no ``max_steps`` cap, which ``train_set`` may set), ``init.kind = pretrained``; these settings come
    last so that no other ``--set`` turns the import back into training.
    """
    spec = run_spec(config, run, dataset)
    a = config["archs"][arch]
    ds = config["datasets"][dataset]
    sets: dict[str, Any] = {
        "seed": int(seed),
        "model.name": a["model"],
        "model.kwargs": a.get("kwargs") or {},
        "data.root": config["data_root"],
        "data.id": dataset,
    }
    if run_needs_aux(config, run, dataset):
        sets["data.aux"] = ds["aux"]
    if spec["init"] == "pretrain":
        sets["init.checkpoint"] = f"{run_dir(config['results'], dataset, arch, 'pretrain', seed)}/final.pt"
        sets["init.kind"] = "run"
    sets.update(ds.get("set") or {})
    sets.update(spec["set"])
    sets.update(config.get("train_set") or {})
    imported = pretrain_import(config, dataset, arch) if run == "pretrain" else None
    if imported:
        sets.update({"init.checkpoint": imported, "init.kind": "pretrained", "init.skip_head": False,
                     "train.epochs": 0, "train.max_steps": None})
    args: list[str] = []
    for f in spec["configs"]:
        args += ["--config", f]
    for k, v in sets.items():
        args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def dg_run_args(config: dict, dataset: str, algorithm: str) -> list[str]:
    """Arguments of ``greg dg run`` (without ``--out`` and ``--device``) for one (dataset, algorithm) of the
    ``dg`` config section (docs/DG.md); shell-quote them before use."""
    dg = config.get("dg") or {}
    args = ["--dataset", dataset, "--algorithm", algorithm, "--restarts", str(int(dg.get("restarts", 10))),
            "--seed", str(int(dg.get("seed", 0))), "--hparams-seed", str(int(dg.get("hparams_seed", 0))),
            "--data-root", str(config.get("data_root", "data"))]
    if dg.get("steps") is not None:
        args += ["--steps", str(int(dg["steps"]))]
    for k, v in ((dg.get("set_by_algorithm") or {}).get(algorithm) or {}).items():
        args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def check_extra_names(config: dict) -> None:
    """Fail (``ReportError`` naming the config key) when ``pretrain.import``, ``figures.fig_sam.runs`` or the
    ``dg`` section name a dataset, arch, run, DG dataset or DG algorithm that does not exist."""
    for dataset, by_arch in ((config.get("pretrain") or {}).get("import") or {}).items():
        for arch, path in (by_arch or {}).items():
            if path and (dataset not in config["datasets"] or arch not in config["archs"]):
                raise ReportError(f"config pretrain.import.{dataset}.{arch}: unknown dataset or arch (datasets: "
                                  f"{sorted(config['datasets'])}, archs: {sorted(config['archs'])})")
    variants = config.get("variants") or {}
    fig = (config.get("figures") or {}).get("fig_sam") or {}
    for label, run in (fig.get("runs") or {}).items():
        if run != "pretrain" and run not in variants:
            raise ReportError(f"config figures.fig_sam.runs[{label!r}]: unknown run {run!r} "
                              f"(pretrain or one of {sorted(variants)})")
    dg = config.get("dg") or {}
    if dg.get("datasets"):
        from greg.dg.algorithms import DG_ALGORITHMS
        from greg.dg.datasets import DG_DATASETS

        for key, known in (("datasets", DG_DATASETS.names()), ("algorithms", DG_ALGORITHMS.names())):
            bad = [n for n in dg.get(key) or [] if n not in known]
            if bad:
                raise ReportError(f"config dg.{key}: unknown {bad} (known: {sorted(known)})")
        for algorithm in dg.get("set_by_algorithm") or {}:
            if algorithm not in DG_ALGORITHMS.names():
                raise ReportError(f"config dg.set_by_algorithm: unknown algorithm {algorithm!r} "
                                  f"(known: {sorted(DG_ALGORITHMS.names())})")


def registry_checker(config: dict) -> Callable[[dict], str | None]:
    """``unavailable(cell)`` from the package registries: a reason string when the cell's method, model,
    detector or dataset is not implemented, else None. A registry that cannot be imported is skipped."""
    import importlib
    import warnings

    def names(module: str, attr: str) -> set[str] | None:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  (a piece still being written must not break the DAG)
            warnings.warn(f"greg.report: cannot import {module} ({e}); not checking its names", stacklevel=2)
            return None
        reg = getattr(mod, attr, None)
        if reg is None:
            return set(mod.names()) if hasattr(mod, "names") else None
        return set(reg.names())

    known = {
        "method": names("greg.methods", "METHODS"),
        "model": names("greg.models", "MODELS"),
        "detector": names("greg.detectors", "DETECTORS"),
        "dataset": names("greg.data", "DATASETS"),
    }
    cache: dict[tuple, str | None] = {}

    def unavailable(cell: dict) -> str | None:
        key = (cell["dataset"], cell["arch"], cell["run"], cell["detector"])
        if key not in cache:
            ds = config["datasets"].get(cell["dataset"], {})
            wanted = [("method", run_method(config, cell["run"], cell["dataset"])),
                      ("model", config["archs"][cell["arch"]]["model"]),
                      ("detector", cell["detector"]), ("dataset", cell["dataset"])]
            wanted += [("dataset", d) for d in ds.get("ood", [])]
            if cell["run"] != "pretrain":
                wanted.append(("dataset", ds.get("aux")))
            missing = [f"{kind} {name!r}" for kind, name in wanted
                       if known[kind] is not None and name not in known[kind]]
            cache[key] = f"not implemented: {', '.join(missing)}" if missing else None
        return cache[key]

    return unavailable


def table_inputs(resolved: dict) -> list[str]:
    """Every metrics.csv a resolved table reads (the rule's inputs), without duplicates, in order."""
    seen: dict[str, None] = {}
    for row in resolved["rows"]:
        for cell in row["cells"]:
            for f in cell["files"]:
                seen.setdefault(f, None)
    return list(seen)


# ------------------------------------------------------------------------------------ building tables


@dataclass
class Value:
    mean: float | None  # None: n/a
    std: float | None = None
    n: int = 0
    style: str = ""  # "best" | "second" | ""


@dataclass
class Table:
    spec: dict
    columns: list[tuple[int, str, str]]  # (group index, ood set, metric)
    rows: list[tuple[str, str | None, list[Value]]] = field(default_factory=list)


def build_table(resolved: dict, reader: Callable[[str], dict] = read_metrics_csv) -> Table:
    """Read every cell's metrics files and aggregate over seeds; mark best / runner-up per column."""
    fpr, metrics, digits = resolved["fpr"], resolved["metrics"], resolved["digits"]
    columns = [(gi, c["ood"], m) for gi, g in enumerate(resolved["groups"]) for c in g["columns"] for m in metrics]
    cache: dict[str, dict] = {}
    table = Table(resolved, columns)
    for row in resolved["rows"]:
        values = []
        for gi, ood, metric in columns:
            cell = row["cells"][gi]
            if cell["na"]:
                values.append(Value(None))
                continue
            col = metric_column(metric, fpr)
            seeds = []
            for f in cell["files"]:
                if f not in cache:
                    cache[f] = reader(f)
                data = cache[f]
                if ood not in data:
                    raise ReportError(f"{f}: no row for OOD set {ood!r} (has {', '.join(data)})")
                if col not in data[ood]:
                    raise ReportError(f"{f}: no value of {col!r} for {ood!r}")
                seeds.append(data[ood][col])
            if not seeds:
                raise ReportError(f"row {row['label']!r}: no metrics files for an available cell")
            m, s = mean_std(seeds)
            values.append(Value(m, s, len(seeds)))
        table.rows.append((row["label"], row.get("section"), values))
    for j, (_, _, metric) in enumerate(columns):
        higher = METRICS[metric][1]
        shown = sorted({round(v.mean, digits) for _, _, vals in table.rows if (v := vals[j]).mean is not None},
                       reverse=higher)
        for _, _, vals in table.rows:
            v = vals[j]
            if v.mean is None:
                continue
            r = round(v.mean, digits)
            if r == shown[0]:
                v.style = "best"
            elif len(shown) > 1 and r == shown[1]:
                v.style = "second"
    return table


def latex_escape(text: str) -> str:
    """Escape the characters that break a LaTeX cell (``& % # _``); ``$``, ``\\`` and braces pass through."""
    return "".join("\\" + ch if ch in "&%#_" else ch for ch in str(text))


def format_value(v: Value, digits: int, show_std: bool) -> str:
    if v.mean is None:
        return "n/a"
    text = f"{v.mean:.{digits}f}"
    if v.style == "best":
        text = rf"\textbf{{{text}}}"
    elif v.style == "second":
        text = rf"\underline{{{text}}}"
    if show_std and v.n > 1:
        text += rf"{{\scriptsize$\pm${v.std:.{digits}f}}}"
    return text


def render_tex(table: Table, template: str | Path = DEFAULT_TEMPLATE) -> str:
    import jinja2

    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"table template not found: {template}")
    env = jinja2.Environment(
        block_start_string="<%", block_end_string="%>", variable_start_string="<<", variable_end_string=">>",
        comment_start_string="<#", comment_end_string="#>", trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
    )
    env.filters["tex"] = latex_escape
    spec = table.spec
    metrics = spec["metrics"]
    ncols = len(table.columns)
    groups = [{"label": g["label"], "span": len(g["columns"]) * len(metrics),
               "columns": [{"label": c["label"], "span": len(metrics)} for c in g["columns"]]}
              for g in spec["groups"]]
    rows, last_section = [], None
    for label, section, values in table.rows:
        if section and section != last_section:
            rows.append({"section": section})
        last_section = section or last_section
        rows.append({"label": label,
                     "cells": [format_value(v, spec["digits"], spec["show_std"]) for v in values]})
    return env.from_string(template.read_text(encoding="utf-8")).render(
        name=spec["name"], caption=spec["caption"], fpr_note=spec["fpr_note"], ncols=ncols,
        colspec="l" + "c" * ncols, groups=groups,
        show_ood_row=any(len(g["columns"]) > 1 or g["columns"][0]["ood"] != "mean" for g in spec["groups"]),
        metric_labels=[METRICS[m][2] for m in metrics] * (ncols // max(len(metrics), 1)),
        rows=rows, show_std=spec["show_std"],
    )


def render_csv(table: Table) -> str:
    """Long format: one line per (row, column group, OOD set, metric) with mean, std, n_seeds, style."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "section", "group", "dataset", "arch", "ood_set", "metric", "column",
                "mean", "std", "n_seeds", "mark"])
    spec = table.spec
    for (label, section, values), row in zip(table.rows, spec["rows"]):
        for (gi, ood, metric), v in zip(table.columns, values):
            cell = row["cells"][gi]
            w.writerow([spec["name"], label, section or "", spec["groups"][gi]["label"], cell["dataset"],
                        cell["arch"], ood, metric, metric_column(metric, spec["fpr"]),
                        "n/a" if v.mean is None else repr(round(v.mean, 6)),
                        "" if v.std is None else repr(round(v.std, 6)), v.n, v.style])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- figures


def _save_figure(fig: Any, out: str | Path) -> list[Path]:
    """Write ``out`` (PDF) and the PNG of the same stem, atomically."""
    out = Path(out)
    paths = [out.with_suffix(".pdf"), out.with_suffix(".png")]
    for p in paths:
        with io.atomic_open(p, "wb") as f:
            fig.savefig(f, format=p.suffix[1:], bbox_inches="tight", dpi=150)
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have it."""
    pts = [(int(r["step"]), float(r[key])) for r in records if key in r and r[key] is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def seed_mean(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds at the steps every seed logged."""
    common = set(curves[0][0])
    for steps, _ in curves[1:]:
        common &= set(steps)
    steps = sorted(common)
    maps = [dict(zip(s, v)) for s, v in curves]
    means, stds = [], []
    for s in steps:
        m, sd = mean_std([mp[s] for mp in maps])
        means.append(m)
        stds.append(sd)
    return steps, means, stds


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_fig3(runs: dict[str, list[str]], out: str | Path, keys: tuple[str, str] = ("energy", "score_grad_norm"),
              smooth_window: int | None = None) -> list[Path]:
    """Energy loss and mean input-gradient norm of the score over training steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"energy": r"energy loss $\mathcal{L}_S$", "score_grad_norm": r"mean $\|\nabla_x S(x)\|_2$"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        for label, files in runs.items():
            curves = [series(read_jsonl(f), key) for f in files]
            curves = [c for c in curves if c[0]]
            if not curves:
                raise ReportError(f"run {label!r}: no {key!r} values in {', '.join(files)}")
            steps, means, stds = seed_mean(curves)
            w = smooth_window if smooth_window is not None else max(1, len(steps) // 50)
            m, s = smooth(means, w), smooth(stds, w)
            ax.plot(steps, m, label=label)
            if len(curves) > 1:
                ax.fill_between(steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_title(titles.get(key, key))
        ax.legend()
    fig.tight_layout()
    try:
        return _save_figure(fig, out)
    finally:
        plt.close(fig)


def load_scores(path: str | Path) -> Any:
    """Per-sample scores from a ``greg evaluate`` npz: the ``scores`` array (or the file's only array)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    with np.load(path) as z:
        if "scores" in z.files:
            return np.asarray(z["scores"], dtype=np.float64)
        if len(z.files) == 1:
            return np.asarray(z[z.files[0]], dtype=np.float64)
        raise ReportError(f"{path}: no 'scores' array (has {', '.join(z.files)})")


def plot_fig4(models: dict[str, list[str]], ood: str, out: str | Path, id_label: str = "ID",
              ood_label: str | None = None, bins: int = 60) -> list[Path]:
    """Histograms of the energy score, ID test set vs one OOD set, one panel per model (seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, (label, dirs) in zip(axes[0], models.items()):
        s_id = np.concatenate([load_scores(Path(d) / "scores" / "id.npz") for d in dirs])
        s_ood = np.concatenate([load_scores(Path(d) / "scores" / f"{ood}.npz") for d in dirs])
        both = np.concatenate([s_id, s_ood])
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        ax.hist(s_id, bins=edges, alpha=0.6, density=True, label=id_label)
        ax.hist(s_ood, bins=edges, alpha=0.6, density=True, label=ood_label or ood)
        ax.set_title(label)
        ax.set_xlabel(r"energy score $S(x)$ (higher = more OOD)")
        ax.legend()
    fig.tight_layout()
    try:
        return _save_figure(fig, out)
    finally:
        plt.close(fig)


# SAM appendix figure: titles of the greg.diagnostics arrays (raw values, not outlier scores).
SAM_DIAGNOSTICS = {
    "head_grad_norm": r"per-sample head gradient norm $\|\nabla_W \mathrm{CE}(f, \hat y)\|$",
    "max_logit": r"max logit $\max_k f_k(x)$",
    "energy": r"energy score $-\log\sum_k e^{f_k(x)}$ (higher = more OOD)",
    "msp": r"max softmax probability",
}


def collect_fig_sam(models: dict[str, str], id_dataset: str, ood: list[str], root: str, device: str = "cpu",
                    max_samples: int | None = 2000, batch_size: int = 256) -> dict[str, dict[str, dict]]:
    """``{label: {set: {diagnostic: array}}}`` for each run checkpoint (``greg.diagnostics.collect_checkpoint``:
    ID test split as ``"id"`` and each OOD set, the same subsample of each set for every model)."""
    from greg import diagnostics

    out = {}
    for label, ckpt in models.items():
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"model {label!r}: checkpoint not found: {ckpt}")
        out[label] = diagnostics.collect_checkpoint(ckpt, id_dataset, ood, root, device, batch_size=batch_size,
                                                    max_samples=max_samples)
    return out


def plot_fig_sam(diags: dict[str, dict[str, dict]], out: str | Path,
                 keys: tuple[str, ...] = ("head_grad_norm", "max_logit", "energy"),
                 set_labels: dict[str, str] | None = None, bins: int = 50) -> list[Path]:
    """The SAM appendix's diagnostics: one row per model (the first: before fine-tuning), one column per
    diagnostic, each panel the histograms of the ID test set and of every OOD set. Bins are shared down a
    column, so the last column shows the score distributions before vs after fine-tuning on one axis."""
    import numpy as np
    from matplotlib.figure import Figure

    if not diags:
        raise ReportError("fig-sam: no models")
    bad = [k for k in keys if k not in SAM_DIAGNOSTICS]
    if bad:
        raise ReportError(f"fig-sam: unknown diagnostic(s) {bad}; known: {', '.join(SAM_DIAGNOSTICS)}")
    set_labels = set_labels or {}
    fig = Figure(figsize=(4.2 * len(keys), 3.0 * len(diags)))
    axes = fig.subplots(len(diags), len(keys), squeeze=False)
    for j, key in enumerate(keys):
        values = [np.asarray(d[key], dtype=float) for sets in diags.values() for d in sets.values()]
        finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
        edges = np.histogram_bin_edges(finite, bins=bins) if finite.size else np.linspace(0.0, 1.0, bins + 1)
        for i, (label, sets) in enumerate(diags.items()):
            ax = axes[i][j]
            for name, d in sets.items():
                v = np.asarray(d[key], dtype=float)
                ax.hist(v[np.isfinite(v)], bins=edges, density=True, histtype="step", linewidth=1.2,
                        label=set_labels.get(name, "ID" if name == "id" else name))
            ax.set_title(label, fontsize="medium")
            ax.set_xlabel(SAM_DIAGNOSTICS[key], fontsize="small")
            if j == 0:
                ax.set_ylabel("density")
            if i == 0 and j == len(keys) - 1:
                ax.legend(fontsize="x-small")
    fig.tight_layout()
    return _save_figure(fig, out)


def save_fig_sam_npz(path: str | Path, diags: dict[str, dict[str, dict]]) -> None:
    """Every array of the figure in one ``.npz`` (atomic), named ``<model label>/<set>/<diagnostic>``."""
    from greg import diagnostics

    diagnostics.save_npz(path, {f"{label}/{name}": d for label, sets in diags.items() for name, d in sets.items()})


# ----------------------------------------------------------------------------------------------- CLI


def _label_files(items: list[str], what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ReportError(f"{what} expects LABEL=PATH[,PATH...], got {item!r}")
        label, paths = item.split("=", 1)
        out.setdefault(label, []).extend(p for p in paths.split(",") if p)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="report_command", metavar="WHAT")
    sub.required = True
    t = sub.add_parser("table", help="aggregate metrics.csv files over seeds into OUT.tex and OUT.csv")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="resolved table spec (JSON file, see greg.report.resolve_table)")
    src.add_argument("--spec-json", help="the resolved table spec as a JSON string")
    t.add_argument("--tex", required=True, help="LaTeX output")
    t.add_argument("--csv", required=True, help="CSV output (same numbers, long format)")
    t.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="jinja2 LaTeX template")
    f3 = sub.add_parser("fig3", help="energy loss and input-gradient norm during training")
    f3.add_argument("--run", action="append", required=True, metavar="LABEL=JSONL[,JSONL...]",
                    help="a curve: its label and the metrics.jsonl of each seed")
    f3.add_argument("--smooth", type=int, default=None, help="moving-average window in logged points")
    f3.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    f4 = sub.add_parser("fig4", help="energy-score histograms, ID vs one OOD set")
    f4.add_argument("--model", action="append", required=True, metavar="LABEL=EVAL_DIR[,EVAL_DIR...]",
                    help="a panel: its label and the evaluation directory of each seed (with scores/)")
    f4.add_argument("--ood", required=True, help="OOD set name (scores/<ood>.npz)")
    f4.add_argument("--id-label", default="ID")
    f4.add_argument("--ood-label", default=None)
    f4.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    fs = sub.add_parser("fig-sam", help="SAM appendix diagnostics: head-gradient norm, max logit, scores, "
                                        "ID vs each OOD set, before/after fine-tuning (greg.diagnostics)")
    fs.add_argument("--model", action="append", required=True, metavar="LABEL=CHECKPOINT",
                    help="a row: its label and run checkpoint (final.pt); the first is the model before fine-tuning")
    fs.add_argument("--id", required=True, help="ID dataset (its test split)")
    fs.add_argument("--ood", required=True, help="comma-separated OOD sets (test splits)")
    fs.add_argument("--root", default="data", help="data root (default: data)")
    fs.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    fs.add_argument("--max-samples", type=int, default=2000, help="subsample of each set (0 = all)")
    fs.add_argument("--batch-size", type=int, default=256)
    fs.add_argument("--keys", default="head_grad_norm,max_logit,energy",
                    help=f"comma-separated columns among {', '.join(SAM_DIAGNOSTICS)}")
    fs.add_argument("--labels-json", default="{}", help="JSON object: set name -> display name")
    fs.add_argument("--out", required=True, help="output PDF (a PNG of the same stem is written too)")
    fs.add_argument("--npz", default=None, help="also write every per-sample array to this .npz")


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
    labels = json.loads(args.labels_json)
    if not isinstance(labels, dict):
        raise ReportError(f"--labels-json must be a JSON object, got {args.labels_json!r}")
    from greg.train import resolve_device

    diags = collect_fig_sam(models, args.id, [o for o in args.ood.split(",") if o], args.root,
                            str(resolve_device(args.device)), args.max_samples or None, args.batch_size)
    if args.npz:
        save_fig_sam_npz(args.npz, diags)
    return plot_fig_sam(diags, args.out, keys, labels)


def run(args: argparse.Namespace) -> int:
    # one line per error; exit 2 for bad input (ReportError, a missing input file), 1 for I/O
    from greg.errors import cli_errors

    with cli_errors("greg report") as ce:
        if args.report_command == "table":
            spec = json.loads(args.spec_json) if args.spec_json else json.loads(Path(args.spec).read_text())
            table = build_table(spec)
            io.atomic_write_text(args.tex, render_tex(table, args.template))
            io.atomic_write_text(args.csv, render_csv(table))
            na = sum(v.mean is None for _, _, vals in table.rows for v in vals)
            print(f"{args.tex}: {len(table.rows)} rows x {len(table.columns)} columns ({na} n/a cells)",
                  file=sys.stderr)
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
    return ce.code
