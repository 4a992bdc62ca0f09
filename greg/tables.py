"""Paper tables: aggregate ``greg evaluate`` metrics over seeds and render LaTeX and CSV.

A table is built from a *resolved* spec (``greg.plan.resolve_table``): every cell lists its ``metrics.csv``
files, one per seed, or says why it is n/a. For each cell, the value of each seed's row (an OOD set, or
``mean``) is read; the table shows the mean over seeds and the sample standard deviation (ddof=1; 0 with
one seed). The best mean of each column is bold and the runner-up underlined, compared on the displayed
(rounded) values so that ties are marked alike; a column whose values all tie marks none. A table with
sections (Tables 8-10: one block of rows per network) marks best / runner-up within each section. Every table that
shows FPR95 states its convention (default: the paper's, ``fpr95_idpos``).
"""

from __future__ import annotations

import csv
import io as _io
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from greg import io

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
            bad = [f for f, v in zip(cell["files"], seeds) if not math.isfinite(v)]
            if bad:  # a NaN/inf metric is flagged (n/a), never averaged into a number or ranked
                print(f"greg report: warning: {bad[0]}: {col} of {ood!r} is {seeds[cell['files'].index(bad[0])]}; "
                      f"cell {row['label']!r} / {ood} / {metric} shown as n/a", file=sys.stderr)
                values.append(Value(None))
                continue
            m, s = mean_std(seeds)
            values.append(Value(m, s, len(seeds)))
        table.rows.append((row["label"], row.get("section"), values))
    # Rows of one section (Tables 8-10: one network each) are ranked among themselves, not across networks.
    blocks: dict[str | None, list[list[Value]]] = {}
    for _, section, vals in table.rows:
        blocks.setdefault(section, []).append(vals)
    for block in blocks.values():
        for j, (_, _, metric) in enumerate(columns):
            _mark_best(block, j, METRICS[metric][1], digits)
    return table


def _mark_best(rows: list[list[Value]], j: int, higher: bool, digits: int) -> None:
    """Style column ``j`` of ``rows``: best bold, runner-up underlined, compared as displayed."""
    shown = sorted({round(v.mean, digits) for vals in rows if (v := vals[j]).mean is not None}, reverse=higher)
    if len(shown) < 2:  # one value, or every row ties: marking the whole column says nothing
        return
    for vals in rows:
        v = vals[j]
        if v.mean is None:
            continue
        r = round(v.mean, digits)
        if r == shown[0]:
            v.style = "best"
        elif r == shown[1]:
            v.style = "second"


def latex_escape(text: str) -> str:
    """Escape the characters that break a LaTeX cell (``& % # _``) once: an already escaped one (``\\%``, as a
    caption written for LaTeX has it) is kept as it is; ``$``, ``\\`` and braces pass through."""
    text = str(text)
    return "".join("\\" + ch if ch in "&%#_" and (i == 0 or text[i - 1] != "\\") else ch
                   for i, ch in enumerate(text))


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
    import jinja2  # only rendering needs it; greg.plan imports this module for the Snakefile

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
    groups = [{"label": g.get("header", g["label"]), "span": len(g["columns"]) * len(metrics),
               "columns": [{"label": c["label"], "span": len(metrics)} for c in g["columns"]]}
              for g in spec["groups"]]
    rows, last_section = [], None
    headers = {r.get("section"): r.get("section_header") or r.get("section") for r in spec["rows"]}
    for label, section, values in table.rows:
        if section and section != last_section:
            rows.append({"section": headers.get(section, section)})
        last_section = section or last_section
        rows.append({"label": label,
                     "cells": [v if isinstance(v, str) else format_value(v, spec["digits"], spec["show_std"])
                               for v in values]})
    subs = spec.get("substitutes") or []
    smoke = (f"Smoke run on substitute data, not a paper result ({'; '.join(subs)}). " if subs else "")
    return env.from_string(template.read_text(encoding="utf-8")).render(
        name=spec["name"], caption=spec["caption"], smoke=smoke,
        # the convention sentence only where an FPR95 column is shown
        fpr_note=spec["fpr_note"] if "fpr95" in metrics else "", ncols=ncols,
        has_na=any("n/a" in str(c) for r in rows for c in r.get("cells", [])),
        colspec="l" + "c" * ncols, groups=groups,
        show_ood_row=any(len(g["columns"]) > 1 or g["columns"][0]["ood"] != "mean" for g in spec["groups"]),
        metric_labels=[METRICS[m][2] for m in metrics] * (ncols // max(len(metrics), 1)),
        rows=rows, show_std=spec["show_std"],
    )


def render_csv(table: Table) -> str:
    """Long format: one line per (row, column group, OOD set, metric) with mean, std, n_seeds, style, the
    cell's run and detector, and the paper's printed value with ``delta`` = mean - paper (empty where the paper
    prints none or the spec has no ``paper``, see :func:`attach_paper`)."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "section", "group", "dataset", "arch", "ood_set", "metric", "column",
                "mean", "std", "n_seeds", "mark", "run", "detector", "paper", "delta"])
    spec = table.spec
    for i, ((label, section, values), row) in enumerate(zip(table.rows, spec["rows"])):
        for (gi, ood, metric), v, paper in zip(table.columns, values, _paper_row(table, i)):
            cell = row["cells"][gi]
            w.writerow([spec["name"], label, section or "", spec["groups"][gi]["label"], cell["dataset"],
                        cell["arch"], ood, metric, metric_column(metric, spec["fpr"]),
                        "n/a" if v.mean is None else repr(round(v.mean, 6)),
                        "" if v.std is None else repr(round(v.std, 6)), v.n, v.style, cell["run"],
                        cell["detector"], "" if paper is None else repr(paper),
                        "" if paper is None or v.mean is None else repr(round(v.mean - paper, 6))])
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the paper's numbers
# config/paper_results.yaml holds every number the paper prints (docs/PAPER_TABLES.md). A rendered table gets
# the paper's value beside each of our cells (CSV columns `paper` and `delta` = ours - paper, and a
# `<name>_vs_paper.tex`); `reproduction_summary` says per table which cells are reproduced within TOLERANCE.

# |ours - paper| (percentage points) within which a cell counts as reproduced. FPR95 is far noisier than
# AUROC at the paper's scale (a few hundred OOD images around the 95 % threshold move it by points; the paper's
# own seeds and reruns of its baselines differ by ~1-2 points), hence the wider band.
TOLERANCE: dict[str, float] = {"fpr95": 2.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "id_acc": 1.0}


def load_paper_results(path: str | Path) -> dict:
    """``config/paper_results.yaml``: ``{"source", "tables": {name: {groups, metrics, rows}}, "typos"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper results file not found: {path}")
    doc = io.yaml_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise ReportError(f"{path}: expected a mapping with 'tables'")
    return doc


def paper_cells(doc: dict, name: str) -> dict[tuple, float]:
    """(section, row label, group label, OOD set, metric) -> printed value; {} when ``name`` is not a paper table."""
    t = (doc.get("tables") or {}).get(name)
    if not t:
        return {}
    out: dict[tuple, float] = {}
    for r in t["rows"]:
        values = iter(r["values"])
        for g in t["groups"]:
            for ood in g["ood"]:
                for metric in t["metrics"]:
                    out[(r.get("section"), r["label"], g["label"], ood, metric)] = float(next(values))
    return out


def is_aliased(aliases: dict | None) -> bool:
    """True when a config maps the paper's datasets / archs / OOD sets to others (the smoke run): then our
    numbers are not the paper's experiment and deltas mean nothing."""
    return any(bool(m) for m in (aliases or {}).values())


def attach_paper(resolved: dict, doc: dict, aliases: dict | None = None) -> dict:
    """A copy of a resolved table with ``paper``: the paper's value of every cell, in ``build_table``'s column
    order (None where the paper prints none), matched by row (section, label), group label, OOD set and
    metric. Column OOD sets are mapped back through ``aliases['ood']`` (smoke: tiny_photos <- svhn)."""
    cells = paper_cells(doc, resolved["name"])
    ood_alias = (aliases or {}).get("ood") or {}
    back: dict[str, str] = {}
    for original, aliased in ood_alias.items():
        back.setdefault(aliased, original)
    rows = []
    for row in resolved["rows"]:
        values = []
        for g in resolved["groups"]:
            for c in g["columns"]:
                ood = c["ood"] if c["ood"] == "mean" else back.get(c["ood"], c["ood"])
                for metric in resolved["metrics"]:
                    values.append(cells.get((row.get("section"), row["label"], g["label"], ood, metric)))
        rows.append(values)
    return {**resolved, "paper": {"source": doc.get("source", ""), "aliased": is_aliased(aliases),
                                  "found": bool(cells), "rows": rows}}


def _paper_row(table: Table, i: int) -> list[float | None]:
    paper = table.spec.get("paper")
    return paper["rows"][i] if paper else [None] * len(table.columns)


def render_tex_vs_paper(table: Table, template: str | Path | Traversable = DEFAULT_TEMPLATE) -> str:
    """The table with the paper's printed value after each of our cells: ``ours (paper)``."""
    digits = table.spec["digits"]
    paper = table.spec.get("paper") or {}
    note = (" Each cell: ours (the paper's printed value; -- where it prints none)."
            + (" Smoke run on substitute data: the comparison is only a format check." if paper.get("aliased")
               else ""))
    rows = []
    for i, (label, section, values) in enumerate(table.rows):
        cells = []
        for v, p in zip(values, _paper_row(table, i)):
            ours = format_value(v, digits, False)
            cells.append(f"{ours} {{\\scriptsize({'--' if p is None else f'{p:.{digits}f}'})}}")
        rows.append((label, section, cells))
    spec = {**table.spec, "caption": table.spec["caption"] + note, "show_std": False}
    return render_tex(Table(spec, table.columns, rows), template)


def _cell_name(r: dict) -> str:
    where = "/".join(x for x in (r["section"], r["row"]) if x)
    return f"{where}, {r['group']}, {r['ood_set']}, {r['metric']}"


def reproduction_summary(tables: dict[str, list[dict] | None], aliased: bool = False,
                         tolerance: dict[str, float] | None = None, n_worst: int = 3) -> tuple[str, str]:
    """Markdown and CSV: per table, how many of the paper's cells we reproduce within ``tolerance``, the worst
    cells, and the runs whose cells are n/a. ``tables``: name -> the rows of its ``render_csv`` output (None:
    the table was not built)."""
    tol = {**TOLERANCE, **(tolerance or {})}
    md = ["# Reproduction of the paper's tables", "",
          "Each cell of a table is compared with the number the paper prints (config/paper_results.yaml, as "
          "printed: the paper's own typos are listed in docs/PAPER_TABLES.md and not corrected here). A cell is "
          "*reproduced* when |ours - paper| is at most " + ", ".join(f"{v:g} ({k})" for k, v in tol.items())
          + " percentage points. delta = ours - paper, ours = mean over seeds.", ""]
    if aliased:
        md += [("**Smoke / substitute run**: the config maps the paper's datasets, networks or OOD sets to "
                "others (`aliases`), so these deltas are meaningless; this file only shows that the comparison "
                "runs."), ""]
    md += ["| table | paper cells | compared | reproduced | worst cell (delta) | missing runs |",
           "|---|---|---|---|---|---|"]
    out = _io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["table", "paper_cells", "compared", "reproduced", "reproduced_share", "worst_cell", "worst_delta",
                "missing_runs", "aliased"])
    details = []
    for name, rows in tables.items():
        if rows is None:
            md.append(f"| {name} | | | | | table not built |")
            w.writerow([name, "", "", "", "", "", "", "table not built", aliased])
            continue
        with_paper = [r for r in rows if r.get("paper", "") != ""]
        compared = [r for r in with_paper if r["mean"] != "n/a"]
        ok = [r for r in compared if abs(float(r["delta"])) <= tol.get(r["metric"], 1.0) + 1e-9]
        worst = sorted(compared, key=lambda r: -abs(float(r["delta"])) / tol.get(r["metric"], 1.0))[:n_worst]
        missing = sorted({f"{r['run']} ({r['dataset']}, {r['arch']}, {r['detector']})"
                          for r in with_paper if r["mean"] == "n/a"})
        share = f"{len(ok) / len(compared):.0%}" if compared else ""
        top = worst[0] if worst else None
        md.append(f"| {name} | {len(with_paper)} | {len(compared)} | {len(ok)} ({share or '-'}) | "
                  + (f"{_cell_name(top)} ({float(top['delta']):+.2f})" if top else "")
                  + f" | {len(missing) or ''} |")
        w.writerow([name, len(with_paper), len(compared), len(ok), share,
                    _cell_name(top) if top else "", f"{float(top['delta']):.4f}" if top else "",
                    "; ".join(missing), aliased])
        lines = [f"## {name}", ""]
        for r in worst:
            lines.append(f"- {_cell_name(r)}: ours {float(r['mean']):.2f}, paper {float(r['paper']):.2f}, "
                         f"delta {float(r['delta']):+.2f}")
        if missing:
            lines.append("- missing runs (cells n/a: method, detector or model not implemented): "
                         + ", ".join(missing))
        if not with_paper:
            lines.append("- the paper prints no number for this layout's cells")
        details += lines + [""]
    return "\n".join(md + [""] + details), out.getvalue()
