"""The reproduction summary: per paper table, which cells are within tolerance of the paper's numbers.

Reads the CSVs of tables rendered with the paper's values (``greg report table --paper``; ``greg.tables``
``render_csv``). A compared cell is *reproduced* (|ours - paper| within :data:`TOLERANCE`), *off*, or *off,
assumption-based*: off, and its recipe rests on an assumption of the layout (the CSV's ``assumptions``
column, ``config/tables.yaml`` ``assumptions``), so a larger delta is expected there.
"""

from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

from greg.errors import ReportError
from greg.tables import csv_rows

# |ours - paper| (percentage points) within which a cell counts as reproduced. FPR95 is far noisier than
# AUROC at the paper's scale (a few hundred OOD images around the 95 % threshold move it by points; the paper's
# own seeds and reruns of its baselines differ by ~1-2 points), hence the wider band.
TOLERANCE: dict[str, float] = {"fpr95": 2.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "id_acc": 1.0}
# the columns of a table CSV the summary reads (greg.tables.render_csv writes them)
NEEDED = ("row", "section", "group", "dataset", "arch", "ood_set", "metric", "mean", "run", "detector", "paper",
          "delta")


def _number(path: Path, lineno: int, column: str, text: str, allowed: tuple[str, ...]) -> None:
    if text in allowed:
        return
    try:
        ok = math.isfinite(float(text))
    except ValueError:
        ok = False
    if not ok:
        raise ReportError(f"{path}, line {lineno}: {column} is {text[:40]!r}, not a finite number"
                          + (f" or {' / '.join(repr(a) for a in allowed)}" if allowed else ""))


def read_table_csv(path: str | Path) -> list[dict]:
    """The rows of a table CSV, checked: every :data:`NEEDED` column present and each number a number
    (a ReportError names the file and the line)."""
    path = Path(path)
    rows = []
    expected = f"a table CSV of `greg report table --paper` has {', '.join(NEEDED)}"
    for lineno, row in csv_rows(path, NEEDED, "table CSV", expected):
        if None in row or any(v is None for v in row.values()):
            n_fields = sum(k is not None for k in row)  # the header's: a row's keys are the header's (+ None)
            raise ReportError(f"{path}, line {lineno}: {n_fields} fields expected")
        _number(path, lineno, "mean", row["mean"], ("n/a",))
        _number(path, lineno, "paper", row["paper"], ("",))
        _number(path, lineno, "delta", row["delta"], ("",))
        if row["paper"] and row["mean"] != "n/a" and not row["delta"]:
            raise ReportError(f"{path}, line {lineno}: a mean and a paper value but no delta")
        rows.append(row)
    return rows


def _cell_name(r: dict) -> str:
    where = "/".join(x for x in (r["section"], r["row"]) if x)
    return f"{where}, {r['group']}, {r['ood_set']}, {r['metric']}"


def _intro(tol: dict[str, float], aliased: bool) -> list[str]:
    md = ["# Reproduction of the paper's tables", "",
          "Each cell of a table is compared with the number the paper prints (config/paper_results.yaml, as "
          "printed: the paper's own typos are listed in docs/PAPER_TABLES.md and not corrected here). A cell is "
          "*reproduced* when |ours - paper| is at most " + ", ".join(f"{v:g} ({k})" for k, v in tol.items())
          + " percentage points, else *off*; *off, assumption-based* cells are off and rest on a recipe that "
          "neither the paper nor the released code gives (marked in the table, config/tables.yaml "
          "`assumptions`), so a larger delta is expected there. delta = ours - paper, ours = mean over seeds.",
          ""]
    if aliased:
        md += [("**Smoke / substitute run**: the config maps the paper's datasets, networks or OOD sets to "
                "others (`aliases`), or is the rehearsal (fake data, a few optimizer steps per run), so these "
                "deltas are meaningless; this file only shows that the comparison runs."), ""]
    header = ("| table | paper cells | compared | reproduced | off | off, assumption-based | worst cell (delta) "
              "| missing runs |")
    return md + [header, "|---|---|---|---|---|---|---|---|"]


def reproduction_summary(tables: dict[str, list[dict] | None], aliased: bool = False,
                         tolerance: dict[str, float] | None = None, n_worst: int = 3) -> tuple[str, str]:
    """Markdown and CSV: per table, how many of the paper's cells we reproduce within ``tolerance``, how many
    are off (and of those, assumption-based), the worst cells, and the runs whose cells are n/a. ``tables``:
    name -> the rows of its ``render_csv`` output (None: the table was not built)."""
    tol = {**TOLERANCE, **(tolerance or {})}
    md = _intro(tol, aliased)
    out = _io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["table", "paper_cells", "compared", "reproduced", "reproduced_share", "off", "off_assumption",
                "worst_cell", "worst_delta", "missing_runs", "aliased"])
    details = []
    for name, rows in tables.items():
        if rows is None:
            md.append(f"| {name} | | | | | | | table not built |")
            w.writerow([name, "", "", "", "", "", "", "", "", "table not built", aliased])
            continue
        with_paper = [r for r in rows if r.get("paper", "") != ""]
        compared = [r for r in with_paper if r["mean"] != "n/a"]
        within = [abs(float(r["delta"])) <= tol.get(r["metric"], 1.0) + 1e-9 for r in compared]
        ok = [r for r, w_ in zip(compared, within) if w_]
        off = [r for r, w_ in zip(compared, within) if not w_]
        assumed = [r for r in off if r.get("assumptions")]
        worst = sorted(compared, key=lambda r: -abs(float(r["delta"])) / tol.get(r["metric"], 1.0))[:n_worst]
        missing = sorted({f"{r['run']} ({r['dataset']}, {r['arch']}, {r['detector']})"
                          for r in with_paper if r["mean"] == "n/a"})
        share = f"{len(ok) / len(compared):.0%}" if compared else ""
        top = worst[0] if worst else None
        md.append(f"| {name} | {len(with_paper)} | {len(compared)} | {len(ok)} ({share or '-'}) | {len(off)} | "
                  f"{len(assumed)} | " + (f"{_cell_name(top)} ({float(top['delta']):+.2f})" if top else "")
                  + f" | {len(missing) or ''} |")
        w.writerow([name, len(with_paper), len(compared), len(ok), share, len(off), len(assumed),
                    _cell_name(top) if top else "", f"{float(top['delta']):.4f}" if top else "",
                    "; ".join(missing), aliased])
        lines = [f"## {name}", ""]
        for r in worst:
            kind = ("reproduced" if abs(float(r["delta"])) <= tol.get(r["metric"], 1.0) + 1e-9 else
                    f"off, assumption-based ({r['assumptions']})" if r.get("assumptions") else "off")
            lines.append(f"- {_cell_name(r)}: ours {float(r['mean']):.2f}, paper {float(r['paper']):.2f}, "
                         f"delta {float(r['delta']):+.2f}: {kind}")
        if missing:
            lines.append("- missing runs (cells n/a: method, detector or model not implemented): "
                         + ", ".join(missing))
        if not with_paper:
            lines.append("- the paper prints no number for this layout's cells")
        details += lines + [""]
    return "\n".join(md + [""] + details), out.getvalue()
