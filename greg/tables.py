"""Paper tables: aggregate ``greg evaluate`` metrics over seeds and render LaTeX and CSV.

A table is built from a *resolved* spec (``greg.plan.resolve_table``): every cell lists its ``metrics.csv``
files, one per seed, or says why it is n/a. For each cell, the value of each seed's row (an OOD set, or
``mean``) is read; the table shows the mean over seeds and the sample standard deviation (ddof=1; 0 with
one seed). The best mean of each column is bold and the runner-up underlined, compared on the displayed
(rounded) values so that ties are marked alike. Every table states its FPR95 convention (default: the
paper's, ``fpr95_idpos``).
"""

from __future__ import annotations

import csv
import io as _io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

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
# Package data (pyproject.toml), so a non-editable install finds it too; ``--template`` replaces it.
DEFAULT_TEMPLATE = resources.files("greg") / "templates" / "table.tex.j2"



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


def render_tex(table: Table, template: str | Path | Traversable = DEFAULT_TEMPLATE) -> str:
    import jinja2

    if not isinstance(template, Traversable):
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

