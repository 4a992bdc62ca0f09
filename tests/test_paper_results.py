"""config/paper_results.yaml: the paper's Tables 1-10, checked against themselves.

Each printed average is recomputed from its per-set values and every number printed in two tables (same
experiment id, dataset, arch, OOD set, metric) is compared; what disagrees beyond rounding must be one of the
documented `typos`, and every documented typo must still disagree (a fixed transcription fails too).
"""

from __future__ import annotations

import statistics
from itertools import combinations
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-9


def _load() -> dict:
    return yaml.safe_load((ROOT / "config/paper_results.yaml").read_text(encoding="utf-8"))


def cells(doc: dict) -> list[dict]:
    """One dict per printed number: table, section, row, group, id, dataset, arch, ood, metric, value."""
    out = []
    for name, t in doc["tables"].items():
        for r in t["rows"]:
            values = iter(r["values"])
            for g in t["groups"]:
                for ood in g["ood"]:
                    for metric in t["metrics"]:
                        out.append({"table": name, "section": r.get("section"), "row": r["label"],
                                    "group": g["label"], "id": r["id"], "dataset": g["dataset"],
                                    "arch": g.get("arch") or r["arch"], "ood": ood, "metric": metric,
                                    "value": float(next(values))})
    return out


def _key(c: dict) -> tuple:
    return (c["table"], c.get("section"), c["row"], c["group"], c["ood"], c["metric"])


def _typo_key(doc: dict, typo: dict) -> tuple:
    groups = doc["tables"][typo["table"]]["groups"]
    group = typo.get("group") or (groups[0]["label"] if len(groups) == 1 else None)
    return (typo["table"], typo.get("section"), typo["row"], group, typo["ood"], typo["metric"])


def average_mismatches(doc: dict) -> dict[tuple, tuple[float, float]]:
    """(table, section, row, group, 'mean', metric) -> (printed average, mean of the per-set values)."""
    tol = float(doc["rounding_tolerance"])
    by_line: dict[tuple, dict[str, float]] = {}
    for c in cells(doc):
        by_line.setdefault((c["table"], c["section"], c["row"], c["group"], c["metric"]), {})[c["ood"]] = c["value"]
    out = {}
    for (table, section, row, group, metric), per in by_line.items():
        sets = [v for o, v in per.items() if o != "mean"]
        if sets and "mean" in per:
            mu = statistics.fmean(sets)
            if abs(mu - per["mean"]) > tol + EPS:
                out[(table, section, row, group, "mean", metric)] = (per["mean"], mu)
    return out


def repeat_mismatches(doc: dict) -> list[tuple[dict, dict]]:
    """Pairs of cells of the same experiment (id, dataset, arch, OOD set, metric) printed differently."""
    tol = float(doc["rounding_tolerance"])
    same: dict[tuple, list[dict]] = {}
    for c in cells(doc):
        same.setdefault((c["id"], c["dataset"], c["arch"], c["ood"], c["metric"]), []).append(c)
    return [(a, b) for group in same.values() for a, b in combinations(group, 2)
            if abs(a["value"] - b["value"]) > tol + EPS]


def test_every_table_is_complete_and_rows_are_unique():
    doc = _load()
    assert list(doc["tables"]) == [f"table{i}" for i in range(1, 11)]
    n = 0
    for name, t in doc["tables"].items():
        width = sum(len(g["ood"]) for g in t["groups"]) * len(t["metrics"])
        labels = [(r.get("section"), r["label"]) for r in t["rows"]]
        assert len(set(labels)) == len(labels), name
        for r in t["rows"]:
            assert len(r["values"]) == width, (name, r["label"])
            assert all(0.0 <= float(v) <= 100.0 for v in r["values"]), (name, r["label"])
            assert ("arch" in r) != all("arch" in g for g in t["groups"]), (name, r["label"])
        n += width * len(t["rows"])
    # 10x6 + 13x6 + 11x10 + 6x4 + 4x2 + 5x2 + 4x4 + 30x14 + 39x14 + 12x14 printed numbers
    assert n == 60 + 78 + 110 + 24 + 8 + 10 + 16 + 420 + 546 + 168 == 1440


def test_spot_values_as_printed():
    c = {_key(x): x["value"] for x in cells(_load())}
    assert c[("table1", None, "GReg", "DenseNet", "mean", "fpr95")] == 7.93
    assert c[("table3", None, "GReg+", "OOD Datasets", "mean", "fpr95")] == 35.08
    assert c[("table6", None, "Clean", "WRN", "mean", "id_acc")] == 94.84
    assert c[("table7", None, "32", "CIFAR-100", "mean", "auroc")] == 88.433
    assert c[("table9", "DenseNet", "GReg+", "OOD Datasets", "svhn", "fpr95")] == 14.44
    assert c[("table10", "WRN", "DOS", "OOD Datasets", "lsun_crop", "auroc")] == 98.98


def test_printed_averages_match_their_per_set_values_except_documented_typos():
    doc = _load()
    found = average_mismatches(doc)
    listed = {_typo_key(doc, t): t for t in doc["typos"] if t["kind"] == "average"}
    assert sorted(found) == sorted(listed), "new (or fixed) inconsistency between an Average and its per-set values"
    for key, (printed, mu) in found.items():
        assert listed[key]["printed"] == printed
        assert abs(listed[key]["recomputed"] - mu) <= 0.005 + EPS, (key, mu)


def test_cells_repeated_across_tables_agree_except_documented_typos():
    doc = _load()
    listed = {_typo_key(doc, t) for t in doc["typos"]}
    pairs = repeat_mismatches(doc)
    unexplained = [(_key(a), _key(b)) for a, b in pairs if _key(a) not in listed and _key(b) not in listed]
    assert not unexplained
    by_key = {_key(c): c for c in cells(doc)}
    for typo in doc["typos"]:
        key = _typo_key(doc, typo)
        assert by_key[key]["value"] == typo["printed"], typo
        if typo["kind"] == "repeat":
            twins = [b if _key(a) == key else a for a, b in pairs if key in (_key(a), _key(b))]
            assert [t["table"] for t in twins] == [typo["other"]]
            assert twins[0]["value"] == typo["recomputed"]


def test_the_cross_checks_cover_the_repeated_tables():
    # Table 1 = Table 8's Average, Table 2 = Table 9's, and the ablations reuse main-table runs: each of these
    # pairs must share at least one experiment, or the repeat check above would compare nothing.
    doc = _load()
    shared: dict[tuple, set[str]] = {}
    for c in cells(doc):
        shared.setdefault((c["id"], c["dataset"], c["arch"], c["ood"], c["metric"]), set()).add(c["table"])
    linked = {frozenset(p) for tables in shared.values() for p in combinations(sorted(tables), 2)}
    for a, b in [(1, 8), (2, 9), (8, 10), (4, 1), (4, 2), (4, 10), (5, 2), (5, 9), (7, 1), (7, 2), (7, 10)]:
        assert frozenset((f"table{a}", f"table{b}")) in linked, (a, b)
    # Table 1's 10 rows x 3 archs x 2 metrics all reappear in Table 8
    t1 = {k for k, tables in shared.items() if "table1" in tables}
    assert len(t1) == 60 and all("table8" in shared[k] for k in t1)


def test_the_known_typos_are_documented_with_printed_and_recomputed_values():
    doc = _load()
    typos = {(t["table"], t.get("section"), t["row"], t["metric"]): (t["printed"], t["recomputed"])
             for t in doc["typos"]}
    assert typos[("table8", "ResNet", "Energy score", "fpr95")] == (33.32, 39.33)   # Table 1: 39.32
    assert typos[("table9", "DenseNet", "POEM", "fpr95")] == (55.33, 59.33)         # Table 2: 59.33
    assert typos[("table2", None, "LiNe", "auroc")] == (80.9, 80.97)                # Table 9: 80.97


def _mini(avg: float, twin: float) -> dict:
    groups = [{"label": "G", "dataset": "d", "arch": "a", "ood": ["s1", "s2", "mean"]}]
    return {"rounding_tolerance": 0.01, "typos": [], "tables": {
        "t1": {"metrics": ["fpr95"], "groups": groups, "rows": [{"label": "X", "id": "x", "values": [10, 20.01, avg]}]},
        "t2": {"metrics": ["fpr95"], "groups": [{**groups[0], "ood": ["mean"]}],
               "rows": [{"label": "X", "id": "x", "values": [twin]}]}}}


@pytest.mark.parametrize("avg, twin, n_avg, n_rep", [
    (15.0, 15.0, 0, 0),     # (10 + 20.01) / 2 = 15.005: within rounding of 15.00 and of 15.01
    (15.01, 15.0, 0, 0),
    (15.02, 15.02, 1, 0),   # 0.015 off the per-set mean
    (15.0, 15.02, 0, 1),    # the same experiment printed 15.00 and 15.02
])
def test_checkers_flag_only_what_exceeds_rounding(avg, twin, n_avg, n_rep):
    doc = _mini(avg, twin)
    found = average_mismatches(doc)
    assert len(found) == n_avg
    if found:
        assert found[("t1", None, "X", "G", "mean", "fpr95")] == (avg, pytest.approx(15.005))
    assert len(repeat_mismatches(doc)) == n_rep
