"""The paper's numbers beside ours (greg.paper_compare, greg.reproduction): attach_paper, the `paper` / `delta` CSV columns, the
`_vs_paper.tex` rendering and the reproduction summary; all against hand-computed values."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

from greg import paper_compare as PC
from greg import plan as P
from greg import reproduction as R
from greg import tables as T

ROOT = Path(__file__).resolve().parents[1]
HEADER = "ood_set,n_id,n_ood,id_acc,fpr95_idpos,fpr95_oodpos,auroc,aupr_in,aupr_out\n"

DOC = {"source": "test", "tables": {"tableT": {
    "metrics": ["fpr95", "auroc"],
    "groups": [{"label": "G", "dataset": "d", "arch": "n", "ood": ["svhn", "mean"]}],
    "rows": [{"label": "A", "id": "a", "values": [8.5, 95.0, 11.0, 90.25]},
             {"label": "C", "id": "c", "values": [1, 2, 3, 4]}]}}}


def _metrics(path: Path, fpr: float, auroc: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"tiny_photos,10,10,90,{fpr},0,{auroc},0,0\nmean,10,10,90,{fpr + 2},0,{auroc - 1},0,0\n")
    return str(path)


def _resolved(tmp_path: Path) -> dict:
    # ours: A seed 1 / 2 -> svhn (as tiny_photos) FPR95 10 / 11 (mean 10.5), AUROC 94 / 94.5 (94.25);
    # mean column FPR95 12.5, AUROC 93.25. Row B has no paper row; C is n/a.
    files = [_metrics(tmp_path / f"a{s}.csv", f, a) for s, (f, a) in enumerate([(10.0, 94.0), (11.0, 94.5)])]
    cell = lambda na=None: {"dataset": "tiny", "arch": "n", "run": "r", "detector": "energy", "na": na,
                            "files": [] if na else files}
    return {"name": "tableT", "caption": "Test table", "fpr": "fpr95_idpos",
            "fpr_note": T.FPR_CONVENTIONS["fpr95_idpos"], "metrics": ["fpr95", "auroc"], "digits": 2,
            "show_std": True,
            "groups": [{"label": "G", "dataset": "tiny", "arch": "n",
                        "columns": [{"ood": "tiny_photos", "label": "Photos"}, {"ood": "mean", "label": "Average"}]}],
            "rows": [{"label": "A", "section": None, "cells": [cell()]},
                     {"label": "B", "section": None, "cells": [cell()]},
                     {"label": "C", "section": None, "cells": [cell("not implemented: method 'x'")]}]}


def _overlay(base: dict, over: dict) -> dict:
    """Snakemake's --configfile merge: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


ALIASES = {"dataset": {"cifar10": "tiny"}, "arch": {}, "ood": {"svhn": "tiny_photos"}}


def test_attach_paper_maps_cells_through_the_aliases(tmp_path):
    spec = PC.attach_paper(_resolved(tmp_path), DOC, ALIASES)
    assert spec["paper"]["rows"] == [[8.5, 95.0, 11.0, 90.25], [None] * 4, [1.0, 2.0, 3.0, 4.0]]
    assert spec["paper"]["aliased"] is True and spec["paper"]["found"] is True
    assert PC.attach_paper(_resolved(tmp_path), DOC, {"dataset": {}, "arch": {}, "ood": {}})["paper"]["aliased"] is False
    # without the OOD alias, tiny_photos has no paper column; the mean still matches
    assert PC.attach_paper(_resolved(tmp_path), DOC, {})["paper"]["rows"][0] == [None, None, 11.0, 90.25]
    other = {**_resolved(tmp_path), "name": "table_extra"}
    assert PC.attach_paper(other, DOC, {})["paper"]["found"] is False


def test_csv_has_paper_and_delta(tmp_path):
    table = T.build_table(PC.attach_paper(_resolved(tmp_path), DOC, ALIASES))
    rows = list(csv.DictReader(io.StringIO(T.render_csv(table))))
    a = {(r["ood_set"], r["metric"]): r for r in rows if r["row"] == "A"}
    assert float(a[("tiny_photos", "fpr95")]["paper"]) == 8.5
    assert float(a[("tiny_photos", "fpr95")]["delta"]) == pytest.approx(2.0)      # 10.5 - 8.5
    assert float(a[("tiny_photos", "auroc")]["delta"]) == pytest.approx(-0.75)    # 94.25 - 95
    assert float(a[("mean", "fpr95")]["delta"]) == pytest.approx(1.5)             # 12.5 - 11
    assert float(a[("mean", "auroc")]["delta"]) == pytest.approx(3.0)             # 93.25 - 90.25
    assert {r["paper"] for r in rows if r["row"] == "B"} == {""}
    c = [r for r in rows if r["row"] == "C"]
    assert {(r["mean"], r["delta"], r["run"]) for r in c} == {("n/a", "", "r")}
    # a table built without paper values keeps the columns, empty
    plain = list(csv.DictReader(io.StringIO(T.render_csv(T.build_table(_resolved(tmp_path))))))
    assert {r["paper"] for r in plain} == {""} and {r["delta"] for r in plain} == {""}


def test_vs_paper_tex_shows_both(tmp_path):
    tex = PC.render_tex_vs_paper(T.build_table(PC.attach_paper(_resolved(tmp_path), DOC, ALIASES)))
    line_a = next(ln for ln in tex.splitlines() if ln.startswith("A &"))
    # A and B read the same files: every column ties, so nothing is bold
    assert r"A & 10.50 {\scriptsize(8.50)}" in line_a and r"{\scriptsize(90.25)}" in line_a
    assert r"\textbf" not in tex
    line_b = next(ln for ln in tex.splitlines() if ln.startswith("B &"))
    assert line_b.count(r"{\scriptsize(--)}") == 4
    assert "Smoke run" in tex and r"\pm" not in tex


def test_reproduction_summary_counts_by_tolerance(tmp_path):
    table = T.build_table(PC.attach_paper(_resolved(tmp_path), DOC, {"ood": {"svhn": "tiny_photos"}}))
    rows = list(csv.DictReader(io.StringIO(T.render_csv(table))))
    md, out = R.reproduction_summary({"tableT": rows, "tableU": None}, aliased=False)
    summary = {r["table"]: r for r in csv.DictReader(io.StringIO(out))}
    t = summary["tableT"]
    # A's 4 cells and C's 4 (n/a) have paper values; of A's: FPR95 deltas 2.0 and 1.5 are within 2 points,
    # AUROC -0.75 within 1 point, AUROC +3.0 is not
    assert (t["paper_cells"], t["compared"], t["reproduced"], t["reproduced_share"]) == ("8", "4", "3", "75%")
    assert t["worst_cell"] == "A, G, mean, auroc" and float(t["worst_delta"]) == pytest.approx(3.0)
    assert t["missing_runs"] == "r (tiny, n, energy)"
    assert summary["tableU"]["missing_runs"] == "table not built"
    assert "Smoke" not in md and "| tableT | 8 | 4 | 3 (75%) |" in md
    md_smoke, _ = R.reproduction_summary({"tableT": rows}, aliased=True)
    assert "meaningless" in md_smoke


def test_every_cell_of_the_repos_tables_finds_its_paper_value():
    doc = PC.load_paper_results(ROOT / "config/paper_results.yaml")
    full = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    layouts = P.load_tables(ROOT / "config/tables.yaml")
    for name in doc["tables"]:
        spec = PC.attach_paper(P.resolve_table(name, layouts[name], full), doc, full.get("aliases"))
        assert spec["paper"]["aliased"] is False
        assert all(v is not None for row in spec["paper"]["rows"] for v in row), name
    smoke = _overlay(full, yaml.safe_load((ROOT / "config/smoke.yaml").read_text(encoding="utf-8")))
    spec = PC.attach_paper(P.resolve_table("table8", layouts["table8"], smoke), doc, smoke["aliases"])
    assert spec["paper"]["aliased"] is True
    # table8's first row (ResNet MSP) on tiny: Photos <- SVHN (73.02, 89.42) and the average (58.04, 90.49)
    assert [v for v in spec["paper"]["rows"][0] if v is not None] == [73.02, 89.42, 58.04, 90.49]


def test_cli_table_with_paper_and_reproduction(tmp_path):
    import json

    from greg.cli import main as greg_main

    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump(DOC))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_resolved(tmp_path)))
    out = tmp_path / "tables"
    args = ["report", "table", "--spec", str(spec), "--tex", str(out / "tableT.tex"), "--csv", str(out / "tableT.csv"),
            "--paper", str(paper), "--aliases-json", json.dumps(ALIASES), "--vs-paper-tex",
            str(out / "tableT_vs_paper.tex")]
    assert greg_main(args) == 0
    assert r"{\scriptsize(8.50)}" in (out / "tableT_vs_paper.tex").read_text()
    rows = list(csv.DictReader((out / "tableT.csv").open()))
    assert float(next(r for r in rows if r["row"] == "A")["paper"]) == 8.5
    md, summary = out / "reproduction.md", out / "reproduction.csv"
    rc = greg_main(["report", "reproduction", str(out / "tableT.csv"), str(out / "tableU.csv"), "--md", str(md),
                    "--csv", str(summary), "--aliased"])
    assert rc == 0 and "meaningless" in md.read_text()
    got = {r["table"]: r for r in csv.DictReader(summary.open())}
    assert got["tableT"]["reproduced"] == "3" and got["tableU"]["missing_runs"] == "table not built"
    assert greg_main(args[:-2] + ["--aliases-json", "[1]"]) == 2


def test_reproduction_separates_off_and_assumption_based_cells(tmp_path):
    spec = _resolved(tmp_path)
    spec["assumptions"] = {"ours": "a recipe of ours"}
    spec["rows"][0]["cells"][0]["assumptions"] = ["ours"]
    rows = list(csv.DictReader(io.StringIO(T.render_csv(T.build_table(PC.attach_paper(spec, DOC, ALIASES))))))
    assert {r["assumptions"] for r in rows if r["row"] == "A"} == {"ours"}
    md, out = R.reproduction_summary({"tableT": rows})
    t = next(csv.DictReader(io.StringIO(out)))
    # A: 3 of 4 cells within tolerance; the AUROC mean cell (+3.0) is off, and A rests on an assumption
    assert (t["reproduced"], t["off"], t["off_assumption"]) == ("3", "1", "1")
    assert "| tableT | 8 | 4 | 3 (75%) | 1 | 1 |" in md
    assert "A, G, mean, auroc: ours 93.25, paper 90.25, delta +3.00: off, assumption-based (ours)" in md
    plain = list(csv.DictReader(io.StringIO(T.render_csv(T.build_table(PC.attach_paper(_resolved(tmp_path), DOC,
                                                                                        ALIASES))))))
    t = next(csv.DictReader(io.StringIO(R.reproduction_summary({"tableT": plain})[1])))
    assert (t["reproduced"], t["off"], t["off_assumption"]) == ("3", "1", "0")


def test_reproduction_refuses_a_csv_it_cannot_read(tmp_path, capsys):
    from greg.cli import main as greg_main

    md, out = tmp_path / "r.md", tmp_path / "r.csv"
    bad = tmp_path / "table1.csv"
    for text, match in (("a,b\n1,2\n", f"{bad}: missing column(s)"),
                        (("table,row,section,group,dataset,arch,ood_set,metric,mean,run,detector,paper,delta\n"
                         "t,A,,G,d,a,x,auroc,abc,r,energy,90,1\n"), f"{bad}, line 2: mean is 'abc'"),
                        (("table,row,section,group,dataset,arch,ood_set,metric,mean,run,detector,paper,delta\n"
                         "t,A,,G,d,a,x,auroc,90,r,energy,80,\n"), f"{bad}, line 2: a mean and a paper value")):
        bad.write_text(text)
        assert greg_main(["report", "reproduction", str(bad), "--md", str(md), "--csv", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
        assert not md.exists() and not out.exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.update(rows=5), r"tables\.tableT\.rows: expected a list, got int"),
    (lambda t: t["rows"][0].update(values=[1, 2]), r"tables\.tableT\.rows\[0\] \(A\): expected 4 numbers"),
    (lambda t: t["rows"][0].update(values=[1, 2, 3, "x"]), r"tables\.tableT\.rows\[0\] \(A\): expected 4 numbers"),
    (lambda t: t["groups"][0].update(ood="svhn"), r"tables\.tableT\.groups\[0\]: expected a mapping with 'label'"),
    (lambda t: t["rows"].append(3), r"tables\.tableT\.rows\[2\]: expected a mapping"),
])
def test_paper_file_of_the_wrong_shape_is_one_line(tmp_path, capsys, mutate, match):
    import copy
    import json
    import re

    from greg.cli import main as greg_main

    doc = copy.deepcopy(DOC)
    mutate(doc["tables"]["tableT"])
    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump(doc))
    rc = greg_main(["report", "table", "--spec-json", json.dumps(_resolved(tmp_path)), "--tex",
                    str(tmp_path / "t.tex"), "--csv", str(tmp_path / "t.csv"), "--paper", str(paper)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and re.search(rf"{re.escape(str(paper))}: {match}", err), err
