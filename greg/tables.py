"""Result tables: aggregate ``greg evaluate`` metrics over seeds and render LaTeX and CSV.

A table is built from a *resolved* spec (``greg.plan.resolve_table``): every cell lists its ``metrics.csv``
files, one per seed, or says why it is n/a. For each cell, the value of each seed's row (an OOD set, or
``mean``) is read; the table shows the mean over seeds and the sample standard deviation (ddof=1; 0 with
one seed). Two rules mark the best of a column (the spec's ``best``):

- ``mean`` (the paper's convention, every paper table): the best mean is bold and the runner-up underlined,
  compared on the displayed (rounded) values so that ties are marked alike; a column whose values all tie
  marks none;
- ``separated`` (the demo): only a best, bold, and only where its mean minus its std is still better than
  the runner-up's mean plus its std (their mean +- std intervals do not overlap); no runner-up mark.

A table with sections (Tables 8-10: one block of rows per network) ranks within each section. Every table
that shows FPR95 states its convention (default: the paper's, ``fpr95_idpos``). A cell whose recipe rests on
an assumption (``config/tables.yaml`` ``assumptions``) carries a mark, explained under the table; its CSV
line names the assumption. Every string from the spec is escaped (``greg.latex``).

The paper's printed numbers beside ours are ``greg.paper_compare``; the reproduction summary
``greg.reproduction``.
"""

from __future__ import annotations

import csv
import io as _io
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from greg import latex
from greg.columns import COUNT_COLUMNS, PERCENT_COLUMNS, TABLE_COLUMNS
from greg.errors import ReportError

# metric -> (metrics.csv column, None: the table's FPR95 convention; higher is better; LaTeX header)
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
CSV_COLUMNS = tuple(TABLE_COLUMNS)
BEST_RULES = {
    "mean": "Best mean in bold, runner-up underlined (none where all tie)",
    "separated": ("Bold: the best mean, only where its mean $\\pm$ std interval does not overlap the "
                  "runner-up's (no mark otherwise)"),
}
# superscript marks of the assumptions a table shows, in the order they are declared
MARKS = (r"\dagger", r"\ddagger", r"\S", r"\P", r"\|", r"\ast", r"\star")
# Package data (pyproject.toml), so a non-editable install finds it too; ``--template`` replaces it.
DEFAULT_TEMPLATE = resources.files("greg") / "templates" / "table.tex.j2"


def metric_column(metric: str, fpr: str) -> str:
    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if fpr not in FPR_CONVENTIONS:
        raise ReportError(f"unknown FPR95 convention {fpr!r}; known: {', '.join(FPR_CONVENTIONS)}")
    return METRICS[metric][0] or fpr


def _cell_value(path: Path, lineno: int, column: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ReportError(f"{path}, line {lineno}: {column} is {text[:40]!r}, not a number") from None
    if math.isnan(v):
        return v  # flagged as an n/a cell by build_table
    if column in PERCENT_COLUMNS and not 0.0 <= v <= 100.0:
        raise ReportError(f"{path}, line {lineno}: {column} is {text[:40]}, outside 0-100 (%)")
    if column in COUNT_COLUMNS and not (v >= 0 and v == int(v)):
        raise ReportError(f"{path}, line {lineno}: {column} is {text[:40]}, not a sample count")
    if not math.isfinite(v):
        raise ReportError(f"{path}, line {lineno}: {column} is {text[:40]}, not a finite number")
    return v


def csv_rows(path: Path, needed: Iterable[str], what: str, expected: str) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` of the CSV ``path`` (a ``csv.DictReader`` row); ``FileNotFoundError``
    ("<what> not found") when it is absent, :class:`ReportError` naming the missing ``needed`` columns and
    ``expected`` (what such a file has) when its header lacks one."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: missing column(s) {', '.join(missing)}; {expected}")
        for row in reader:
            yield reader.line_num, row


def read_metrics_csv(path: str | Path) -> dict[str, dict[str, float]]:
    """``metrics.csv`` of ``greg evaluate`` -> ``{ood_set: {column: value}}`` (``mean`` included). A second
    row of one OOD set, a cell that is not a number or a percentage outside 0-100 is refused, naming the line
    (NaN passes: the table shows that cell as n/a)."""
    path = Path(path)
    out: dict[str, dict[str, float]] = {}
    for lineno, row in csv_rows(path, CSV_COLUMNS, "metrics file", f"expected {', '.join(CSV_COLUMNS)}"):
        name = row["ood_set"]
        if name in out:
            raise ReportError(f"{path}, line {lineno}: a second row for OOD set {name!r} (one row each)")
        out[name] = {k: _cell_value(path, lineno, k, v) for k, v in row.items()
                     if k not in ("ood_set", None) and v not in ("", None)}
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


def group_metrics(spec: dict, group: dict) -> list[str]:
    """The metrics of a column group: its own ``metrics`` (an ID-accuracy column) or the table's."""
    return list(group.get("metrics") or spec["metrics"])


# ----------------------------------------------------------------------------------------- spec checks
def _fail(origin: str, where: str, what: str) -> None:
    raise ReportError(f"{origin}: {where}: {what}")


def _check_keys(origin: str, where: str, obj: object, types: dict[str, type | tuple]) -> None:
    if not isinstance(obj, dict):
        _fail(origin, where, f"expected a JSON object, got {type(obj).__name__}")
    for key, t in types.items():
        if key not in obj:
            _fail(origin, where, f"missing {key!r}")
        if not isinstance(obj[key], t) or isinstance(obj[key], bool) and t is int:
            _fail(origin, f"{where}.{key}", f"expected {getattr(t, '__name__', t)}, got {type(obj[key]).__name__}")


def check_spec(spec: object, origin: str = "table spec") -> dict:
    """``spec`` if it is a resolved table (``greg.plan.resolve_table``'s shape), else a ReportError naming
    ``origin`` and the first bad entry. The name must be a safe identifier (it reaches ``\\label``)."""
    _check_keys(origin, "spec", spec, {"name": str, "caption": str, "fpr": str, "metrics": list, "digits": int,
                                       "show_std": bool, "groups": list, "rows": list})
    assert isinstance(spec, dict)
    latex.check_name(spec["name"], f"{origin}: table name")
    if not 0 <= spec["digits"] <= 6:
        _fail(origin, "spec.digits", f"{spec['digits']} is not 0-6")
    if spec.get("best", "mean") not in BEST_RULES:
        _fail(origin, "spec.best", f"{spec['best']!r} is not one of {', '.join(BEST_RULES)}")
    if not spec["groups"]:
        _fail(origin, "spec.groups", "no column group")
    for i, g in enumerate(spec["groups"]):
        _check_keys(origin, f"groups[{i}]", g, {"label": str, "columns": list})
        for m in group_metrics(spec, g):
            metric_column(m, spec["fpr"])
        for j, c in enumerate(g["columns"]):
            _check_keys(origin, f"groups[{i}].columns[{j}]", c, {"ood": str, "label": str})
    for i, r in enumerate(spec["rows"]):
        _check_keys(origin, f"rows[{i}]", r, {"label": str, "cells": list})
        if len(r["cells"]) != len(spec["groups"]):
            _fail(origin, f"rows[{i}].cells", f"{len(r['cells'])} cells for {len(spec['groups'])} groups")
        for j, c in enumerate(r["cells"]):
            _check_keys(origin, f"rows[{i}].cells[{j}]", c, {"files": list, "dataset": str, "arch": str,
                                                             "run": str, "detector": str})
            if not all(isinstance(f, str) for f in c["files"]):
                _fail(origin, f"rows[{i}].cells[{j}].files", "expected a list of paths")
    if not isinstance(spec.get("assumptions", {}), dict):
        _fail(origin, "spec.assumptions", "expected a JSON object (key -> note)")
    return spec


# ---------------------------------------------------------------------------------------- aggregation
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


def choose_sweep_settings(resolved: dict, reader: Callable[[str], dict] = read_metrics_csv) -> dict:
    """A copy in which each cell with ``sweep`` (detector setting -> per-seed files, ``greg.plan.with_sweeps``)
    keeps the setting with the lowest mean over seeds of its ``mean`` FPR95 (the table's convention): its
    files, and its name as the cell's detector. Chosen on the test set; ties keep the first (the cell's own)."""
    col = resolved["fpr"]

    def fpr(files: list[str]) -> float:
        v = sum(reader(f)["mean"][col] for f in files) / len(files)
        return v if math.isfinite(v) else math.inf

    rows = []
    for row in resolved["rows"]:
        cells = []
        for cell in row["cells"]:
            if cell.get("sweep") and not cell["na"]:
                best = min(cell["sweep"], key=lambda n: fpr(cell["sweep"][n]))
                cell = {**cell, "detector": best, "files": cell["sweep"][best]}
            cells.append(cell)
        rows.append({**row, "cells": cells})
    return {**resolved, "rows": rows}


def _cell(row: dict, ood: str, col: str, files: list[str], read: Callable[[str], dict]) -> Value:
    seeds = []
    for f in files:
        data = read(f)
        if ood not in data:
            raise ReportError(f"{f}: no row for OOD set {ood!r} (has {', '.join(data)})")
        if col not in data[ood]:
            raise ReportError(f"{f}: no value of {col!r} for {ood!r}")
        seeds.append(data[ood][col])
    if not seeds:
        raise ReportError(f"row {row['label']!r}: no metrics files for an available cell")
    bad = [(f, v) for f, v in zip(files, seeds) if not math.isfinite(v)]
    if bad:  # a NaN metric is flagged (n/a), never averaged into a number or ranked
        print(f"greg report: warning: {bad[0][0]}: {col} of {ood!r} is {bad[0][1]}; cell {row['label']!r} / "
              f"{ood} shown as n/a", file=sys.stderr)
        return Value(None)
    m, s = mean_std(seeds)
    return Value(m, s, len(seeds))


def build_table(resolved: dict, reader: Callable[[str], dict] = read_metrics_csv) -> Table:
    """Read every cell's metrics files and aggregate over seeds; mark the best of each column (a swept
    detector's cell first keeps its best setting, :func:`choose_sweep_settings`)."""
    resolved = choose_sweep_settings(resolved, reader)
    fpr, digits = resolved["fpr"], resolved["digits"]
    columns = [(gi, c["ood"], m) for gi, g in enumerate(resolved["groups"]) for c in g["columns"]
               for m in group_metrics(resolved, g)]
    cache: dict[str, dict] = {}

    def read(f: str) -> dict:
        if f not in cache:
            cache[f] = reader(f)
        return cache[f]

    table = Table(resolved, columns)
    for row in resolved["rows"]:
        values = []
        for gi, ood, metric in columns:
            cell = row["cells"][gi]
            na = cell.get("na")
            values.append(Value(None) if na else _cell(row, ood, metric_column(metric, fpr), cell["files"], read))
        table.rows.append((row["label"], row.get("section"), values))
    # Rows of one section (Tables 8-10: one network each) are ranked among themselves, not across networks.
    blocks: dict[str | None, list[list[Value]]] = {}
    for _, section, vals in table.rows:
        blocks.setdefault(section, []).append(vals)
    mark = _mark_separated if resolved.get("best", "mean") == "separated" else _mark_best
    for block in blocks.values():
        for j, (_, _, metric) in enumerate(columns):
            mark(block, j, METRICS[metric][1], digits)
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


def _mark_separated(rows: list[list[Value]], j: int, higher: bool, digits: int) -> None:
    """Bold the best of column ``j`` only where its mean +- std interval does not overlap the runner-up's."""
    vals = sorted((v for r in rows if (v := r[j]).mean is not None), key=lambda v: v.mean, reverse=higher)
    if len(vals) < 2:
        return
    best, second = vals[0], vals[1]
    if abs(best.mean - second.mean) > (best.std or 0.0) + (second.std or 0.0):
        best.style = "best"


# ------------------------------------------------------------------------------------------ rendering
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


def cell_assumptions(spec: dict, row: dict, gi: int) -> list[str]:
    """The assumption keys of a row's cell in group ``gi`` (none for an n/a cell)."""
    cell = row["cells"][gi]
    return [] if cell.get("na") else [a for a in cell.get("assumptions") or [] if a in (spec.get("assumptions") or {})]


def assumption_marks(spec: dict) -> dict[str, str]:
    """Assumption key -> its LaTeX mark, for the assumptions the table's available cells rest on."""
    used = {a for row in spec["rows"] for gi in range(len(row["cells"])) for a in cell_assumptions(spec, row, gi)}
    keys = [a for a in spec.get("assumptions") or {} if a in used]
    return {a: MARKS[i % len(MARKS)] + "'" * (i // len(MARKS)) for i, a in enumerate(keys)}


def _marked_rows(table: Table, cells: list[list[str]]) -> list[tuple[str, list[str]]]:
    """(row label, cells) with the assumption marks: on the label when every available cell of the row
    rests on the same assumptions, else on each cell."""
    spec = table.spec
    marks = assumption_marks(spec)
    sup = lambda keys: f"$^{{{','.join(marks[a] for a in keys)}}}$" if keys else ""
    out = []
    for (label, _, _), row, texts in zip(table.rows, spec["rows"], cells):
        per_col = [cell_assumptions(spec, row, gi) for gi, _, _ in table.columns]
        available = [k for k, (gi, _, _) in zip(per_col, table.columns) if not row["cells"][gi].get("na")]
        label = latex.escape(label)
        if available and all(k == available[0] for k in available):
            out.append((label + sup(available[0]), texts))
        else:
            out.append((label, [t + sup(k) for t, k in zip(texts, per_col)]))
    return out


def render_tex(table: Table, template: str | Path | Traversable = DEFAULT_TEMPLATE,
               cells: list[list[str]] | None = None) -> str:
    """The LaTeX table; ``cells`` replaces the formatted values (``greg.paper_compare``'s ours-and-paper)."""
    if not isinstance(template, Traversable):
        template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"table template not found: {template}")
    spec = table.spec
    latex.check_name(spec["name"])
    if cells is None:
        cells = [[format_value(v, spec["digits"], spec["show_std"]) for v in values] for _, _, values in table.rows]
    groups = [{"label": g.get("header", g["label"]), "span": len(g["columns"]) * len(group_metrics(spec, g)),
               "columns": [{"label": c["label"], "span": len(group_metrics(spec, g))} for c in g["columns"]]}
              for g in spec["groups"]]
    rows, last_section = [], None
    headers = {r.get("section"): r.get("section_header") or r.get("section") for r in spec["rows"]}
    for (_, section, _), (label, texts) in zip(table.rows, _marked_rows(table, cells)):
        if section and section != last_section:
            rows.append({"section": headers.get(section, section)})
        last_section = section or last_section
        rows.append({"label": label, "cells": texts})
    subs = spec.get("substitutes") or []
    smoke = (f"Smoke run on substitute data, not a paper result ({'; '.join(subs)}). " if subs else "")
    marks = assumption_marks(spec)
    notes = [f"$^{{{mark}}}$ Assumption: {latex.escape(spec['assumptions'][a])}" for a, mark in marks.items()]
    metrics = [m for g in spec["groups"] for m in group_metrics(spec, g)]
    ncols = len(table.columns)
    return latex.render_template(
        template.read_text(encoding="utf-8"), str(template),
        name=spec["name"], caption=spec["caption"], smoke=smoke,
        # the convention sentence only where an FPR95 column is shown (from the table's own registry)
        fpr_note=FPR_CONVENTIONS[spec["fpr"]] if "fpr95" in metrics else "", ncols=ncols,
        has_na=any("n/a" in str(c) for r in rows for c in r.get("cells", [])),
        best_rule=BEST_RULES[spec.get("best", "mean")],
        colspec="l" + "c" * ncols, groups=groups,
        show_ood_row=any(len(g["columns"]) > 1 or g["columns"][0]["ood"] != "mean" for g in spec["groups"]),
        metric_labels=[METRICS[m][2] for _, _, m in table.columns],
        rows=rows, show_std=spec["show_std"], notes=notes,
    )


def paper_values(table: Table, i: int) -> list[float | None]:
    """The paper's printed value of each column of row ``i`` (None: none; ``greg.paper_compare``)."""
    paper = table.spec.get("paper")
    return paper["rows"][i] if paper else [None] * len(table.columns)


def render_csv(table: Table) -> str:
    """Long format: one line per (row, column group, OOD set, metric) with mean, std, n_seeds, style, the
    cell's run and detector, the assumptions its recipe rests on (``;``-separated keys of the layout's
    ``assumptions``), and the paper's printed value with ``delta`` = mean - paper (empty where the paper
    prints none or the spec has no ``paper``, see ``greg.paper_compare.attach_paper``)."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "section", "group", "dataset", "arch", "ood_set", "metric", "column",
                "mean", "std", "n_seeds", "mark", "run", "detector", "assumptions", "paper", "delta"])
    spec = table.spec
    for i, ((label, section, values), row) in enumerate(zip(table.rows, spec["rows"])):
        for (gi, ood, metric), v, paper in zip(table.columns, values, paper_values(table, i)):
            cell = row["cells"][gi]
            w.writerow([spec["name"], label, section or "", spec["groups"][gi]["label"], cell["dataset"],
                        cell["arch"], ood, metric, metric_column(metric, spec["fpr"]),
                        "n/a" if v.mean is None else repr(round(v.mean, 6)),
                        "" if v.std is None else repr(round(v.std, 6)), v.n, v.style, cell["run"],
                        cell["detector"], ";".join(cell_assumptions(spec, row, gi)),
                        "" if paper is None else repr(paper),
                        "" if paper is None or v.mean is None else repr(round(v.mean - paper, 6))])
    return buf.getvalue()
