"""The paper's printed numbers beside ours.

``config/paper_results.yaml`` holds every number the paper prints (docs/PAPER_TABLES.md). A rendered paper
table gets the paper's value beside each of our cells: CSV columns ``paper`` and ``delta`` = ours - paper
(``greg.tables.render_csv``) and a ``<name>_vs_paper.tex`` (:func:`render_tex_vs_paper`);
``greg.reproduction`` summarizes them.
"""

from __future__ import annotations

from importlib.resources.abc import Traversable
from pathlib import Path

from greg import io
from greg.errors import ReportError
from greg.tables import DEFAULT_TEMPLATE, Table, format_value, group_metrics, paper_values, render_tex


def _check_table(path: Path, name: object, t: object) -> None:
    where = f"{path}: tables.{name}"
    if not isinstance(t, dict):
        raise ReportError(f"{where}: expected a mapping, got {type(t).__name__}")
    for key in ("metrics", "groups", "rows"):
        if not isinstance(t.get(key), list):
            raise ReportError(f"{where}.{key}: expected a list, got {type(t.get(key)).__name__}")
    for i, g in enumerate(t["groups"]):
        if not isinstance(g, dict) or not isinstance(g.get("label"), str) or not isinstance(g.get("ood"), list):
            raise ReportError(f"{where}.groups[{i}]: expected a mapping with 'label' and an 'ood' list")
    n = sum(len(g["ood"]) for g in t["groups"]) * len(t["metrics"])
    for i, r in enumerate(t["rows"]):
        values = r.get("values") if isinstance(r, dict) else None
        if not isinstance(r, dict) or not isinstance(r.get("label"), str) or not isinstance(values, list):
            raise ReportError(f"{where}.rows[{i}]: expected a mapping with 'label' and a 'values' list")
        if len(values) != n or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ReportError(f"{where}.rows[{i}] ({r['label']}): expected {n} numbers (groups x OOD sets x "
                              f"metrics), got {len(values)} values")


def load_paper_results(path: str | Path) -> dict:
    """``config/paper_results.yaml``: ``{"source", "tables": {name: {groups, metrics, rows}}, "typos"}``;
    every table's shape is checked (a ReportError names the file and the entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper results file not found: {path}")
    doc = io.yaml_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise ReportError(f"{path}: expected a mapping with 'tables'")
    for name, t in doc["tables"].items():
        _check_table(path, name, t)
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
                for metric in group_metrics(resolved, g):
                    values.append(cells.get((row.get("section"), row["label"], g["label"], ood, metric)))
        rows.append(values)
    # substitutes: the table resolved under aliases or in the rehearsal (greg.plan.resolve_table)
    aliased = is_aliased(aliases) or bool(resolved.get("substitutes"))
    return {**resolved, "paper": {"source": doc.get("source", ""), "aliased": aliased, "found": bool(cells),
                                  "rows": rows}}


def render_tex_vs_paper(table: Table, template: str | Path | Traversable = DEFAULT_TEMPLATE) -> str:
    """The table with the paper's printed value after each of our cells: ``ours (paper)``."""
    digits = table.spec["digits"]
    paper = table.spec.get("paper") or {}
    note = (" Each cell: ours (the paper's printed value; -- where it prints none)."
            + (" Smoke run on substitute data: the comparison is only a format check." if paper.get("aliased")
               else ""))
    cells = []
    for i, (_, _, values) in enumerate(table.rows):
        cells.append([f"{format_value(v, digits, False)} {{\\scriptsize({'--' if p is None else f'{p:.{digits}f}'})}}"
                      for v, p in zip(values, paper_values(table, i))])
    spec = {**table.spec, "caption": table.spec["caption"] + note, "show_std": False}
    return render_tex(Table(spec, table.columns, table.rows), template, cells)
