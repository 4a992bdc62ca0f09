"""greg.report: aggregation over seeds, best/runner-up marks, LaTeX/CSV rendering, spec resolution, figures."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from greg import figures as F
from greg import paper_compare as PC
from greg import plan as P
from greg import tables as T
from greg.cli import main as greg_main

ROOT = Path(__file__).resolve().parents[1]
HEADER = "ood_set,n_id,n_ood,id_acc,fpr95_idpos,fpr95_oodpos,auroc,aupr_in,aupr_out\n"


def write_metrics(path: Path, rows: dict[str, tuple[float, float, float]], acc: float = 90.0) -> str:
    """rows: ood_set -> (fpr95_idpos, fpr95_oodpos, auroc); aupr_in/out are auroc -1/-2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for name, (f_id, f_ood, au) in rows.items():
        lines.append(f"{name},100,50,{acc},{f_id},{f_ood},{au},{au - 1},{au - 2}\n")
    path.write_text("".join(lines))
    return str(path)


def test_mean_std_by_hand():
    m, s = T.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)  # sqrt(((1)^2 + 0 + 1^2) / 2)
    assert T.mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(T.ReportError):
        T.mean_std([])


def test_read_metrics_csv(tmp_path):
    p = write_metrics(tmp_path / "m.csv", {"svhn": (10, 20, 95), "mean": (10, 20, 95)})
    d = T.read_metrics_csv(p)
    assert d["svhn"]["fpr95_idpos"] == 10.0 and d["mean"]["aupr_out"] == 93.0
    bad = tmp_path / "bad.csv"
    bad.write_text("ood_set,auroc\nmean,1\n")
    with pytest.raises(T.ReportError, match="fpr95_idpos"):
        T.read_metrics_csv(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        T.read_metrics_csv(tmp_path / "nope.csv")


def _spec(tmp_path, fpr="fpr95_idpos"):
    """Three rows (a, b, c-n/a) x one group with OOD sets [x, mean] x metrics [fpr95, auroc], 2 seeds."""
    files = {}
    vals = {  # row -> seed -> (x: f_id, f_ood, auroc), (mean: ...)
        "a": [((10, 40, 90), (12, 42, 91)), ((20, 50, 92), (14, 44, 93))],
        "b": [((30, 5, 96), (16, 46, 97)), ((30, 7, 96), (18, 48, 95))],
    }
    for row, seeds in vals.items():
        files[row] = [write_metrics(tmp_path / row / f"s{i}.csv", {"x": x, "mean": m})
                      for i, (x, m) in enumerate(seeds)]
    cell = lambda row, na=None: {"dataset": "d", "arch": "n", "run": row, "detector": "energy", "na": na,
                                 "files": [] if na else files[row]}
    return {
        "name": "tableT", "caption": "Test 100% table", "fpr": fpr, "fpr_note": T.FPR_CONVENTIONS[fpr],
        "metrics": ["fpr95", "auroc"], "digits": 1, "show_std": True,
        "groups": [{"label": "G_1", "dataset": "d", "arch": "n",
                    "columns": [{"ood": "x", "label": "X"}, {"ood": "mean", "label": "Average"}]}],
        "rows": [{"label": "A", "section": "S1", "cells": [cell("a")]},
                 {"label": "B", "section": "S1", "cells": [cell("b")]},
                 {"label": "C", "section": "S2", "cells": [cell("c", "not implemented: method 'poem'")]}],
    }


def test_build_table_aggregates_and_marks(tmp_path):
    t = T.build_table(_spec(tmp_path))
    assert [c[1:] for c in t.columns] == [("x", "fpr95"), ("x", "auroc"), ("mean", "fpr95"), ("mean", "auroc")]
    a, b, c = (vals for _, _, vals in t.rows)
    # row a, OOD x, FPR95 (ID-positive): seeds 10 and 20 -> mean 15, std sqrt(50)
    assert a[0].mean == 15.0 and a[0].std == pytest.approx(math.sqrt(50)) and a[0].n == 2
    assert b[0].mean == 30.0 and b[0].std == 0.0
    assert a[0].style == "best" and b[0].style == "second"  # lower FPR is better
    assert a[1].mean == 91.0 and b[1].mean == 96.0 and b[1].style == "best" and a[1].style == "second"
    assert a[2].mean == 13.0 and b[2].mean == 17.0 and a[3].mean == 92.0 and b[3].mean == 96.0
    assert all(v.mean is None and v.style == "" for v in c)


def test_build_table_other_fpr_convention(tmp_path):
    t = T.build_table(_spec(tmp_path, fpr="fpr95_oodpos"))
    a, b, _ = (vals for _, _, vals in t.rows)
    assert a[0].mean == 45.0 and b[0].mean == 6.0 and b[0].style == "best"


def test_ties_are_marked_alike(tmp_path):
    spec = _spec(tmp_path)
    # row b's x FPR95 made equal to row a's (15.0); a third row d at 40.0: a and b best, d second
    for i, f in enumerate(spec["rows"][1]["cells"][0]["files"]):
        write_metrics(Path(f), {"x": (10 + 10 * i, 5, 96), "mean": (16, 46, 97)})
    d_files = [write_metrics(tmp_path / "d" / f"s{i}.csv", {"x": (40, 5, 96), "mean": (16, 46, 97)}) for i in range(2)]
    spec["rows"].insert(2, {"label": "D", "section": "S1", "cells": [{**spec["rows"][1]["cells"][0], "files": d_files}]})
    a, b, d, _ = (vals for _, _, vals in T.build_table(spec).rows)
    assert (a[0].mean, b[0].mean, d[0].mean) == (15.0, 15.0, 40.0)
    assert a[0].style == b[0].style == "best" and d[0].style == "second"
    # x AUROC: b and d 96.0, a 91.0 -> b and d best, a second
    assert b[1].style == d[1].style == "best" and a[1].style == "second"
    # a column whose shown values all tie marks none (table_sam's nine 100.00 cells)
    spec["rows"][0]["cells"] = [{**spec["rows"][1]["cells"][0]}]
    a, b, d, _ = (vals for _, _, vals in T.build_table(spec).rows)
    assert a[1].mean == b[1].mean == d[1].mean == 96.0 and a[1].style == b[1].style == d[1].style == ""


def test_sections_are_ranked_separately(tmp_path):
    """Tables 8-10: bold / underline within each network's block of rows, never across blocks."""
    spec = _spec(tmp_path)
    more = {"D": ("S2", 40), "E": ("S1", 50)}  # x FPR95 of both seeds (AUROC 96 everywhere)
    for label, (section, fpr) in more.items():
        files = [write_metrics(tmp_path / label / f"s{i}.csv", {"x": (fpr, 5, 96), "mean": (16, 46, 97)})
                 for i in range(2)]
        spec["rows"].append({"label": label, "section": section,
                             "cells": [{**spec["rows"][1]["cells"][0], "files": files}]})
    spec["rows"][1]["section"] = "S2"  # sections: S1 = A (15.0), E (50.0); S2 = B (30.0), D (40.0); C n/a
    a, b, _, d, e = (vals for _, _, vals in T.build_table(spec).rows)
    assert (a[0].mean, e[0].mean, b[0].mean, d[0].mean) == (15.0, 50.0, 30.0, 40.0)
    assert (a[0].style, e[0].style) == ("best", "second")
    assert (b[0].style, d[0].style) == ("best", "second")  # over the whole table: B second, D unmarked
    # x AUROC: S1 = A 91.0, E 96.0; S2 = B, D 96.0 tie -> S2 marks none
    assert (e[1].style, a[1].style, b[1].style, d[1].style) == ("best", "second", "", "")


def test_render_tex_and_csv(tmp_path):
    t = T.build_table(_spec(tmp_path))
    tex = T.render_tex(t)
    assert r"\begin{tabular}{lcccc}" in tex and r"\label{tab:tableT}" in tex
    assert "Test 100\\% table" in tex and "paper convention" in tex and "G\\_1" in tex
    lines = {ln.split("&")[0].strip(): ln for ln in tex.splitlines() if "&" in ln}
    assert r"\textbf{15.0}{\scriptsize$\pm$7.1}" in lines["A"]
    assert r"\textbf{96.0}" in lines["B"]
    assert lines["C"].count("n/a") == 4
    assert r"\textit{S1}" in tex and r"\textit{S2}" in tex
    assert tex.count(r"\multicolumn{2}{c}{X}") == 1 and r"FPR95$\downarrow$" in tex
    rows = list(csv.DictReader(io.StringIO(T.render_csv(t))))
    assert len(rows) == 12
    first = rows[0]
    assert (first["row"], first["ood_set"], first["metric"], first["column"]) == ("A", "x", "fpr95", "fpr95_idpos")
    assert float(first["mean"]) == 15.0 and float(first["std"]) == pytest.approx(math.sqrt(50), abs=1e-6)
    assert {r["mean"] for r in rows if r["row"] == "C"} == {"n/a"}


def _config():
    return {
        "results": "res", "seeds": [1, 2], "data_root": "dat",
        "datasets": {"cifar10": {"aux": "random300k", "ood": ["svhn", "textures"]},
                     "tiny": {"aux": "tiny_aux", "ood": ["tiny_faces", "tiny_photos"], "set": {"data.batch_size": 8}}},
        "archs": {"densenet100": {"model": "densenet100"}, "small_cnn": {"model": "small_cnn", "kwargs": {"widths": [8]}}},
        "pretrain": {"configs": [str(ROOT / "config/methods/ce.yaml")]},
        "variants": {
            "greg": {"configs": [str(ROOT / "config/methods/greg.yaml")], "init": "pretrain", "detector": "energy",
                     "set_by_dataset": {"tiny": {"train.epochs": 2}}},
            "poem": {"configs": [str(ROOT / "config/methods/poem.yaml")], "init": "scratch", "detector": "energy"},
            "future": {"configs": [str(ROOT / "config/methods/poem.yaml")], "init": "scratch", "detector": "energy",
                       "set": {"method.name": "not_a_method_yet"}},
            "k16": {"configs": [str(ROOT / "config/methods/greg_plus.yaml")], "init": "scratch", "detector": "energy",
                    "set": {"method.hparams.n_clusters": None, "schedule.milestones": [10]}},
        },
        "train_set": {"train.max_steps": 3},
        "aliases": {"dataset": {"cifar10": "tiny"}, "arch": {"densenet100": "small_cnn"}, "ood": {"svhn": "tiny_photos"}},
        "labels": {"tiny": "Tiny", "tiny_faces": "Faces"},
    }


def test_resolve_table_aliases_and_na():
    spec = {"caption": "c", "groups": [{"dataset": "cifar10", "arch": "densenet100", "ood": "all"}],
            "rows": [{"label": "MSP", "run": "pretrain", "detector": "msp"}, {"label": "POEM", "run": "poem"}]}
    res = P.resolve_table("t", spec, _config(), lambda cell: "nope" if cell["run"] == "poem" else None)
    g = res["groups"][0]
    assert g["dataset"] == "tiny" and g["arch"] == "small_cnn"
    # an aliased (smoke) table names the data it used, in the header and (substitutes) in the caption
    assert g["label"] == "cifar10" and g["header"] == "Tiny, small_cnn (stand-in for cifar10)"
    assert res["substitutes"] == ["Tiny for cifar10", "small_cnn for densenet100"]
    assert [c["ood"] for c in g["columns"]] == ["tiny_faces", "tiny_photos", "mean"]
    assert [c["label"] for c in g["columns"]] == ["Faces", "tiny_photos", "Average"]
    msp, poem = res["rows"]
    assert msp["cells"][0]["files"] == ["res/tiny/small_cnn/pretrain/seed1/eval/msp/metrics.csv",
                                        "res/tiny/small_cnn/pretrain/seed2/eval/msp/metrics.csv"]
    assert poem["cells"][0]["na"] == "nope" and poem["cells"][0]["files"] == []
    assert P.table_inputs(res) == msp["cells"][0]["files"]
    assert json.loads(json.dumps(res)) == res
    spec_list = {**spec, "groups": [{"dataset": "cifar10", "arch": "densenet100", "ood": ["svhn", "mean"]}]}
    cols = P.resolve_table("t", spec_list, _config())["groups"][0]["columns"]
    assert [(c["ood"], c["label"]) for c in cols] == [("tiny_photos", "tiny_photos (stand-in for svhn)"),
                                                      ("mean", "Average")]
    plain = P.resolve_table("t", spec_list, {**_config(), "aliases": {}, "datasets": {"cifar10": {"ood": ["svhn"]}}})
    assert plain["substitutes"] == [] and plain["groups"][0]["header"] == plain["groups"][0]["label"] == "cifar10"


def test_a_rehearsal_table_says_it_is_no_paper_result():
    """The rehearsal (``rehearsal:`` set, no aliases) runs the paper's names on fakes for a few steps: its
    caption, its table-vs-paper note and reproduction.md's banner say the deltas mean nothing; the paper config
    says nothing of the kind."""
    spec = {"caption": "c", "groups": [{"dataset": "cifar10", "arch": "densenet100", "ood": "mean"}],
            "rows": [{"label": "MSP", "run": "pretrain", "detector": "msp"}]}
    paper_cfg = {**_config(), "aliases": {}}
    rehearsal_cfg = {**paper_cfg, "rehearsal": {"fakes": "results/rehearsal/fakes"}}
    assert not P.substitute_data(paper_cfg) and P.substitute_data(rehearsal_cfg) and P.substitute_data(_config())
    plain, reh = (P.resolve_table("t", spec, c) for c in (paper_cfg, rehearsal_cfg))
    assert plain["substitutes"] == [] and reh["substitutes"] == [P.REHEARSAL_SUBSTITUTE]
    assert reh["groups"] == plain["groups"]  # the paper's data names, unchanged
    assert "Smoke run on substitute data, not a paper result (the rehearsal: fake data" in _tex_of(reh)
    assert "not a paper result" not in _tex_of(plain)
    assert PC.attach_paper(reh, {"tables": {}}, {})["paper"]["aliased"] is True
    assert PC.attach_paper(plain, {"tables": {}}, {})["paper"]["aliased"] is False


def _tex_of(resolved: dict) -> str:
    metrics = {"mean": {"fpr95_idpos": 40.0, "auroc": 90.0}}
    return T.render_tex(T.build_table(resolved, reader=lambda path: metrics))


def test_resolve_table_errors():
    cfg = _config()
    base = {"caption": "c", "groups": [{"dataset": "cifar10", "arch": "densenet100", "ood": "mean"}]}
    with pytest.raises(T.ReportError, match="'bogus'"):
        P.resolve_table("t", {**base, "rows": [{"run": "bogus", "detector": "msp"}]}, cfg)
    with pytest.raises(T.ReportError, match="needs a detector"):
        P.resolve_table("t", {**base, "rows": [{"run": "pretrain"}]}, cfg)
    with pytest.raises(T.ReportError, match="unknown metric"):
        P.resolve_table("t", {**base, "metrics": ["fpr"], "rows": []}, cfg)
    bad_ood = {"caption": "c", "groups": [{"dataset": "tiny", "arch": "small_cnn", "ood": ["lsun"]}], "rows": []}
    with pytest.raises(T.ReportError, match="lsun"):
        P.resolve_table("t", bad_ood, cfg)


def test_train_args():
    cfg = _config()
    args = P.train_args(cfg, "tiny", "small_cnn", "greg", 7)
    assert args[:2] == ["--config", str(ROOT / "config/methods/greg.yaml")]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "seed=7" in sets and "model.name=small_cnn" in sets and "model.kwargs={widths: [8]}" in sets
    assert "data.aux=tiny_aux" in sets and "data.batch_size=8" in sets
    # runtime-only keys are not part of the run's identity: they come from train_runtime_args
    assert not any(s.startswith("data.root=") for s in sets)
    assert P.train_runtime_args(cfg)[:2] == ["--data-root", "dat"]
    assert "init.checkpoint=res/tiny/small_cnn/pretrain/seed7/final.pt" in sets and "init.kind=run" in sets
    assert sets.index("train.epochs=2") < sets.index("train.max_steps=3")  # train_set comes last
    pre = P.train_args(cfg, "tiny", "small_cnn", "pretrain", 1)
    assert not any(s.startswith(("data.aux=", "init.")) for s in pre)
    k16 = P.train_args(cfg, "tiny", "small_cnn", "k16", 1)
    assert "method.hparams.n_clusters=null" in k16 and "schedule.milestones=[10]" in k16
    assert not any(s.startswith("init.") for s in k16)
    assert P.run_method(cfg, "k16", "tiny") == "greg_plus" and P.run_method(cfg, "pretrain", "tiny") == "ce"


def test_train_args_parse_back_in_greg_train(tmp_path):
    from greg.config import load_config

    cfg = _config()
    args = P.train_args(cfg, "tiny", "small_cnn", "k16", 3)
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    resolved = load_config(configs, sets)
    assert resolved["seed"] == 3 and resolved["method"]["hparams"]["n_clusters"] is None
    assert resolved["schedule"]["milestones"] == [10] and resolved["train"]["max_steps"] == 3


def test_registry_checker():
    cfg = _config()
    check = P.registry_checker(cfg)
    ok = {"dataset": "tiny", "arch": "small_cnn", "run": "greg", "detector": "energy"}
    assert check(ok) is None
    assert check({**ok, "run": "poem"}) is None
    assert "method 'not_a_method_yet'" in check({**ok, "run": "future"})
    assert "model 'nope_net'" in P.registry_checker({**cfg, "archs": {"small_cnn": {"model": "nope_net"}}})(ok)
    assert "'no_such_detector'" in check({**ok, "detector": "no_such_detector"})


def test_load_tables_of_the_repo_resolve_against_the_configs():
    tables = P.load_tables(ROOT / "config/tables.yaml")
    assert sorted(tables) == sorted([f"table{i}" for i in range(1, 11)] + ["table_aupr", "table_id_acc", "table_sam"])
    sam_rows = [(r["run"], r["detector"]) for r in tables["table_sam"]["rows"]]
    assert sam_rows == [(run, det) for run in ("pretrain", "sam_only_norm", "sam")
                        for det in ("msp", "energy", "rankfeat")]
    full = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for name, spec in tables.items():
        res = P.resolve_table(name, spec, full)
        assert res["rows"] and all(len(r["cells"]) == len(res["groups"]) for r in res["rows"])


def test_fig3_and_fig4(tmp_path):
    logs = {}
    for run, base in (("e", 2.0), ("g", 1.0)):
        files = []
        for seed in range(2):
            p = tmp_path / run / f"s{seed}" / "metrics.jsonl"
            p.parent.mkdir(parents=True)
            recs = [{"step": s, "energy": base / (s + 1) + seed, **({"score_grad_norm": base * 3} if s % 2 == 0 else {})}
                    for s in range(10)]
            p.write_text("".join(json.dumps(r) + "\n" for r in recs))
            files.append(str(p))
        logs[run] = files
    paths = F.plot_fig3(logs, tmp_path / "out" / "fig3.pdf")
    assert [p.name for p in paths] == ["fig3.pdf", "fig3.png"]
    assert paths[0].read_bytes()[:4] == b"%PDF" and paths[1].read_bytes()[:4] == b"\x89PNG"
    steps, means, stds = F.seed_mean([F.series(F.read_jsonl(f), "energy") for f in logs["e"]])
    assert steps == list(range(10)) and means[0] == pytest.approx(2.5) and stds[0] == pytest.approx(math.sqrt(0.5))
    assert F.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    # a non-number in a log is named with its file and step, not a bare float() error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "energy": 1.5}\n{"step": 4, "energy": "nan?"}\n')
    with pytest.raises(F.ReportError, match=r"bad.jsonl, step 4: 'energy' is 'nan\?', not a number"):
        F.plot_fig3({"e": [str(bad)]}, tmp_path / "out" / "bad.pdf")

    rng = np.random.default_rng(0)
    d = tmp_path / "eval"
    (d / "scores").mkdir(parents=True)
    np.savez(d / "scores" / "id.npz", scores=rng.normal(-10, 1, 50), labels=np.zeros(50))
    np.savez(d / "scores" / "svhn.npz", scores=rng.normal(-4, 1, 40))
    assert F.load_scores(d / "scores" / "svhn.npz").shape == (40,)
    rc = greg_main(["report", "fig4", "--model", f"GReg={d},{d}", "--ood", "svhn", "--out", str(tmp_path / "f4.pdf")])
    assert rc == 0 and (tmp_path / "f4.pdf").read_bytes()[:4] == b"%PDF" and (tmp_path / "f4.png").exists()
    assert greg_main(["report", "fig4", "--model", f"X={d}", "--ood", "lsun", "--out", str(tmp_path / "g.pdf")]) == 2


def test_cli_table(tmp_path):
    spec = _spec(tmp_path)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    tex, out_csv = tmp_path / "t" / "t.tex", tmp_path / "t" / "t.csv"
    assert greg_main(["report", "table", "--spec", str(spec_file), "--tex", str(tex), "--csv", str(out_csv)]) == 0
    assert r"\toprule" in tex.read_text() and len(list(csv.DictReader(out_csv.open()))) == 12
    # an available cell whose file is missing is an error, never a silent n/a
    spec["rows"][0]["cells"][0]["files"].append(str(tmp_path / "missing.csv"))
    rc = greg_main(["report", "table", "--spec-json", json.dumps(spec), "--tex", str(tex), "--csv", str(out_csv)])
    assert rc == 2


def test_pretrain_import_replaces_ce_training():
    cfg = _config()
    cfg["pretrain"]["import"] = {"tiny": {"small_cnn": "densenet100_cifar10_released", "densenet100": None}}
    args = P.train_args(cfg, "tiny", "small_cnn", "pretrain", 4)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    values = dict(a.split("=", 1) for a in sets)
    assert len(values) == len(sets)  # one --set per key
    # train_set's max_steps cap (3) is overridden: 0 steps, the file imported as the run checkpoint
    assert {k: values[k] for k in ("init.checkpoint", "init.kind", "init.skip_head", "train.epochs",
                                   "train.max_steps")} == {
        "init.checkpoint": "densenet100_cifar10_released", "init.kind": "pretrained", "init.skip_head": "false",
        "train.epochs": "0", "train.max_steps": "null"}
    assert P.pretrain_import(cfg, "tiny", "small_cnn") == "densenet100_cifar10_released"
    assert P.pretrain_import(cfg, "tiny", "densenet100") is None and P.pretrain_import(cfg, "cifar10", "x") is None
    # fine-tuning still starts from the run's own pretrain/final.pt; other pairs train CE as before
    greg = P.train_args(cfg, "tiny", "small_cnn", "greg", 4)
    assert "init.checkpoint=res/tiny/small_cnn/pretrain/seed4/final.pt" in greg
    assert not any(a.startswith("init.") for a in P.train_args(cfg, "tiny", "densenet100", "pretrain", 4))
    assert not any(a.startswith("init.") for a in P.train_args(_config(), "tiny", "small_cnn", "pretrain", 4))


def test_pretrain_import_runs_in_greg_train(tmp_path, checkpoint_mirror):
    from greg import data
    from greg.io import safe_torch_load

    if not (checkpoint_mirror / "densenet100_cifar10.pth").is_file():
        pytest.skip(f"no local mirror of the released checkpoints at {checkpoint_mirror}")
    cfg = _config()
    cfg["data_root"] = str(tmp_path / "data")
    cfg["archs"]["densenet100"] = {"model": "densenet100"}
    # tiny: 10 classes, 3x32x32 as CIFAR; the checkpoint comes from the catalog, through the local mirror
    cfg["pretrain"]["import"] = {"tiny": {"densenet100": "densenet100_cifar10_released"}}
    released = data.download("densenet100_cifar10_released", cfg["data_root"], mirror=checkpoint_mirror,
                             progress=False)
    released = data.weights_path("densenet100_cifar10_released", cfg["data_root"])
    out = tmp_path / "run"
    args = P.train_args(cfg, "tiny", "densenet100", "pretrain", 2) + P.train_runtime_args(cfg)
    assert "init.checkpoint=densenet100_cifar10_released" in args  # the name, not a data_root path
    assert greg_main(["train", *args, "--out", str(out), "--device", "cpu"]) == 0
    ckpt = safe_torch_load(out / "final.pt")
    raw = safe_torch_load(released)["state_dict"]  # the CIFAR-10 file names its classifier `fc`
    assert ckpt["arch"] == "densenet100" and ckpt["num_classes"] == 10
    assert torch_equal(ckpt["state_dict"]["head.weight"], raw["fc.weight"])
    assert torch_equal(ckpt["state_dict"]["head.bias"], raw["fc.bias"])
    assert (out / "metrics.jsonl").read_text().strip() == ""  # 0 training steps


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


def test_run_needs_aux_and_sam_train_args():
    cfg = _config()
    cfg["variants"]["sam_only_norm"] = {"configs": [str(ROOT / "config/methods/sam_only_norm.yaml")],
                                        "init": "pretrain", "detector": "energy"}
    assert P.run_needs_aux(cfg, "greg", "tiny") and P.run_needs_aux(cfg, "future", "tiny")  # unknown: True
    assert not P.run_needs_aux(cfg, "sam_only_norm", "tiny") and not P.run_needs_aux(cfg, "pretrain", "tiny")
    sets = P.train_args(cfg, "tiny", "small_cnn", "sam_only_norm", 1)
    assert not any(a.startswith("data.aux=") for a in sets)
    assert "init.checkpoint=res/tiny/small_cnn/pretrain/seed1/final.pt" in sets
    assert P.run_method(cfg, "sam_only_norm", "tiny") == "sam_only_norm"


def test_dg_algorithms_default_to_every_registered_one_in_table_order():
    from greg.dg.algorithms import DG_ALGORITHMS
    from greg.dg.cli import ORDER

    assert P.dg_algorithms({"dg": {"datasets": ["colored_digits"]}}) == ORDER
    assert sorted(ORDER) == DG_ALGORITHMS.names()
    assert P.dg_algorithms({"dg": {"algorithms": ["hgp", "erm"]}}) == ["hgp", "erm"]


def test_dg_run_args():
    cfg = {"data_root": "dat", "dg": {"datasets": ["colored_digits"], "algorithms": ["erm", "hgp"], "restarts": 3,
                                      "steps": 20, "seed": 5, "hparams_seed": 0,
                                      "set_by_algorithm": {"hgp": {"penalty_weight": 1.0e7, "alpha": 0.5}}}}
    assert P.dg_run_args(cfg, "colored_digits", "erm") == [
        "--dataset", "colored_digits", "--algorithm", "erm", "--restarts", "3", "--seed", "5",
        "--hparams-seed", "0", "--data-root", "dat", "--steps", "20"]
    hgp = P.dg_run_args(cfg, "colored_digits", "hgp")
    assert hgp[-4:] == ["--set", "penalty_weight=10000000.0", "--set", "alpha=0.5"]
    cfg["dg"]["steps"] = None
    assert "--steps" not in P.dg_run_args(cfg, "colored_mnist", "erm")


def _tiny_checkpoints(tmp_path):
    import torch

    from greg import models

    paths = {}
    for label, seed in (("CE (before)", 0), ("SAM", 1)):
        torch.manual_seed(seed)
        m = models.create("small_cnn", 10)
        paths[label] = str(tmp_path / f"{seed}.pt")
        models.save_checkpoint(paths[label], m, arch="small_cnn", num_classes=10)
    return paths


def test_fig_sam_cli_writes_figure_and_arrays(tmp_path):
    import torch
    import torch.nn.functional as F

    from greg import data, models

    paths = _tiny_checkpoints(tmp_path)
    out, npz = tmp_path / "fig" / "fig_sam.pdf", tmp_path / "fig" / "fig_sam.npz"
    argv = ["report", "fig-sam", "--id", "tiny", "--ood", "tiny_faces,tiny_gaussian", "--root", str(tmp_path),
            "--device", "cpu", "--max-samples", "12", "--keys", "head_grad_norm,max_logit,energy",
            "--labels-json", '{"id": "Tiny", "tiny_faces": "Faces"}', "--out", str(out), "--npz", str(npz)]
    for label, path in paths.items():
        argv += ["--model", f"{label}={path}"]
    assert greg_main(argv) == 0
    assert out.read_bytes()[:4] == b"%PDF" and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {f"{label}/{s}/{k}" for label in paths for s in ("id", "tiny_faces", "tiny_gaussian")
                           for k in ("head_grad_norm", "max_logit", "energy", "msp")}
    # independent check on the "before" model, ID subsample: per-sample backward of CE(f, argmax f)
    # w.r.t. the head weight, and max logit / -logsumexp of the same forward
    model, _ = models.load_checkpoint(paths["CE (before)"], "cpu")
    model.eval()
    ds = data.subsample(data.load("tiny", "test", str(tmp_path)), 12, 0)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert arrays["CE (before)/id/head_grad_norm"].shape == (12,)
    for i in range(12):
        model.zero_grad()
        f = model(x[i:i + 1])
        F.cross_entropy(f, f.argmax(1)).backward()
        assert arrays["CE (before)/id/head_grad_norm"][i] == pytest.approx(model.head.weight.grad.norm().item(),
                                                                           rel=1e-4)
        assert arrays["CE (before)/id/max_logit"][i] == pytest.approx(f.max().item(), rel=1e-5, abs=1e-6)
        assert arrays["CE (before)/id/energy"][i] == pytest.approx(-torch.logsumexp(f, 1).item(), rel=1e-5)


def test_fig_sam_errors(tmp_path):
    paths = _tiny_checkpoints(tmp_path)
    base = ["report", "fig-sam", "--id", "tiny", "--ood", "tiny_faces", "--root", str(tmp_path), "--device", "cpu",
            "--out", str(tmp_path / "f.pdf")]
    assert greg_main([*base, "--model", f"A={paths['SAM']}", "--keys", "max_logit,nope"]) == 2
    assert greg_main([*base, "--model", "no-equals-sign"]) == 2
    assert greg_main([*base, "--model", f"A={tmp_path / 'missing.pt'}"]) == 2
    assert not (tmp_path / "f.pdf").exists()
    with pytest.raises(T.ReportError, match="no models"):
        F.plot_fig_sam({}, tmp_path / "g.pdf")


def test_check_extra_names():
    cfg = {**_config(), "pretrain": {"configs": [], "import": {"tiny": {"small_cnn": "densenet100_cifar10_released"}}},
           "figures": {"fig_sam": {"runs": {"before": "pretrain", "after": "greg"}}},
           "dg": {"datasets": ["colored_digits"], "algorithms": ["erm", "hgp"], "set_by_algorithm": {"hgp": {}}}}
    P.check_extra_names(cfg)  # all known
    P.check_extra_names({**cfg, "pretrain": {"import": {"nope": {"small_cnn": None}}}})  # null: not imported
    bad = [({**cfg, "pretrain": {"import": {"tiny": {"resnet50": "x.pth"}}}}, "pretrain.import.tiny.resnet50"),
           ({**cfg, "pretrain": {"import": {"tiny": {"small_cnn": "x.pth"}}}}, "pretrain.import.tiny.small_cnn"),
           ({**cfg, "figures": {"fig_sam": {"runs": {"a": "sam_typo"}}}}, "figures.fig_sam.runs"),
           ({**cfg, "dg": {**cfg["dg"], "datasets": ["colored_mnst"]}}, "dg.datasets"),
           ({**cfg, "dg": {**cfg["dg"], "algorithms": ["erm", "not_an_algorithm"]}}, "dg.algorithms"),
           ({**cfg, "dg": {**cfg["dg"], "set_by_algorithm": {"hpg": {}}}}, "dg.set_by_algorithm")]
    for c, key in bad:
        with pytest.raises(T.ReportError, match=key.replace(".", r"\.").replace("[", r"\[")):
            P.check_extra_names(c)


LATEX = shutil.which("pdflatex")


@pytest.mark.skipif(not LATEX and not os.environ.get("GREG_REQUIRE_LATEX"),
                    reason="pdflatex not installed (CI installs it: .ci/run; Debian: texlive-latex-recommended)")
def test_every_table_compiles_with_latex(tmp_path):
    """Every table of config/tables.yaml, rendered as the smoke run renders it (aliases, one seed, n/a cells,
    a caption with %, the assumption marks), one table vs the paper, the demo's table, and table_dg, compile in a minimal document that loads only the
    packages of the table's '% Needs:' header (.ci/compile_tables.py)."""
    from greg.dg.cli import render_table as dg_table

    assert LATEX, "GREG_REQUIRE_LATEX is set but pdflatex is not on PATH"
    cfg = _overlay(yaml.safe_load((ROOT / "config/config.yaml").read_text()),
                   yaml.safe_load((ROOT / "config/smoke.yaml").read_text()))
    cfg["results"] = str(tmp_path / "res")
    out = tmp_path / "tables"
    out.mkdir()
    assumptions = P.load_assumptions(ROOT / "config/tables.yaml")  # their marks and notes compile too
    for i, (name, spec) in enumerate(P.load_tables(ROOT / "config/tables.yaml").items()):
        res = P.resolve_table(name, spec, cfg, lambda cell: "n/a" if cell["detector"] == "rankfeat" else None,
                              assumptions)
        for f in P.table_inputs(res):
            if not Path(f).exists():
                oods = cfg["datasets"]["tiny"]["ood"] + ["mean"]
                write_metrics(Path(f), {o: (10.0 + i + j, 20.0, 90.0 - j) for j, o in enumerate(oods)})
        table = T.build_table(res)
        (out / f"{name}.tex").write_text(T.render_tex(table))
        if name == "table9":
            (out / f"{name}_vs_paper.tex").write_text(PC.render_tex_vs_paper(table))
    demo = {**_overlay(cfg, yaml.safe_load((ROOT / "config/demo.yaml").read_text())), "results": cfg["results"]}
    demo_res = P.resolve_table("table_demo", P.load_tables(ROOT / "config/tables_demo.yaml")["table_demo"], demo)
    for f in P.table_inputs(demo_res):
        write_metrics(Path(f), {o: (10.0, 20.0, 90.0) for o in demo["datasets"]["tiny_m"]["ood"] + ["mean"]})
    (out / "table_demo.tex").write_text(T.render_tex(T.build_table(demo_res)))
    runs = [{"dataset": "colored_digits", "algorithm": a, "n_restarts": 2, "path": a,
             **{m: {"mean": 50.0 + k, "std": 1.0} for m in ("train_acc", "val_acc", "test_acc")}}
            for k, a in enumerate(("erm", "hgp", "oracle"))]
    (out / "table_dg.tex").write_text(dg_table(runs)[0])
    r = subprocess.run([sys.executable, str(ROOT / ".ci/compile_tables.py"), str(out)], capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    assert f"{len(list(out.glob('*.tex')))}/{len(list(out.glob('*.tex')))} tables compile" in r.stderr
    # a broken table fails it, naming the file
    (out / "table_dg.tex").write_text(dg_table(runs)[0].replace("(\\%)", "(%)"))
    r = subprocess.run([sys.executable, str(ROOT / ".ci/compile_tables.py"), str(out / "table_dg.tex")],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 1 and "FAIL" in r.stderr and "table_dg.tex" in r.stderr


def _overlay(base: dict, over: dict) -> dict:
    """Snakemake's --configfile merge: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def test_fig3_legend_states_each_runs_margins(tmp_path):
    """fig3's legend: each curve's energy-loss margins, from the config.yaml the trainer writes beside
    metrics.jsonl; none for a run without margins (or without its config)."""
    run = tmp_path / "greg"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: greg\n  hparams: {m_in: -25.0, m_out: -7.0}\n")
    (tmp_path / "ce").mkdir()
    (tmp_path / "ce" / "config.yaml").write_text("method: {name: ce, hparams: {}}\n")
    assert F.run_margins([str(run / "metrics.jsonl")]) == r"$m_{in}$=-25, $m_{out}$=-7"
    assert F.run_margins([str(tmp_path / "ce" / "metrics.jsonl")]) == ""
    assert F.run_margins([str(tmp_path / "none" / "metrics.jsonl")]) == ""


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--help"], ["(no effect on scores)\n                        (default: 256)", "(default: data)"]),
    (["report", "fig4", "--help"], ["legend name of the ID test set (default: ID)"]),
    (["dg", "run", "--help"], ["(default: 10)"]),
    (["train", "--help"], ["(default: auto)"]),
    (["data", "--help"], []),
    (["report", "--help"], []),
])
def test_every_cli_help_shows_defaults(argv, expected, capsys):
    with pytest.raises(SystemExit):
        greg_main(argv)
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, out
    assert "(default: None)" not in out and "(default: False)" not in out
    # Every option of this command and of each of its sub-commands says what it does, not only its default.
    import argparse
    import importlib

    from greg.cli import COMMANDS

    def options(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from options(sub, f"{path} {name}")
            elif a.option_strings and not isinstance(a, argparse._HelpAction):
                yield path, a

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(parser)
    found = list(options(parser, f"greg {argv[0]}"))
    assert found
    bare = [f"{path} {a.option_strings[0]}" for path, a in found if not (a.help or "").strip()]
    assert not bare, bare


# ------------------------------------------------------------------------ text that reaches LaTeX, inputs
HOSTILE = "a_b %c &d #e $f ^g ~h {i} \\j \\input{/etc/hostname}\nk"


def test_latex_escape_every_special_character():
    from greg import latex

    # by hand: each special character becomes the command that prints it; a line break becomes a space
    assert latex.escape(r"_%&#$^~{}\|<>") == (r"\_\%\&\#\$\textasciicircum{}\textasciitilde{}\{\}"
                                               r"\textbackslash{}\textbar{}\textless{}\textgreater{}")
    assert latex.escape("a\nb") == "a b" and latex.escape("1 ± 2") == r"1 $\pm$ 2"
    assert latex.escape(r"\input{/etc/hostname}") == r"\textbackslash{}input\{/etc/hostname\}"
    for bad in ("t\n\\input{/etc/hostname}", "table 1", "1table", "", "a-b", None):
        with pytest.raises(T.ReportError, match="letters, digits and '_'"):
            latex.check_name(bad)
    assert latex.check_name("table_1") == "table_1"


def _hostile_spec(tmp_path):
    spec = _spec(tmp_path)
    spec["caption"] = "Caption " + HOSTILE
    spec["groups"][0]["label"] = "Group " + HOSTILE
    spec["groups"][0]["columns"][0]["label"] = "Col " + HOSTILE
    spec["rows"][0]["label"] = "Row " + HOSTILE
    spec["rows"][0]["section"] = spec["rows"][1]["section"] = "Section " + HOSTILE
    spec["substitutes"] = ["Sub " + HOSTILE]
    spec["assumptions"] = {"hostile": "Note " + HOSTILE}
    spec["rows"][1]["cells"][0]["assumptions"] = ["hostile"]
    return spec


def test_hostile_strings_never_become_latex_commands(tmp_path):
    tex = T.render_tex(T.build_table(_hostile_spec(tmp_path)))
    # every hostile string arrives escaped: no \input, no unescaped special character from the input
    assert r"\input" not in tex and tex.count(r"\textbackslash{}input\{/etc/hostname\}") == 7
    assert tex.count(r"\_b \%c \&d \#e \$f \textasciicircum{}g \textasciitilde{}h \{i\}") == 7
    assert "\nk" not in tex  # a line break in a label cannot end the comment or the \label line
    # a table name that is not an identifier is refused: it goes into the header comment and \label
    for bad in ("t\n\\input{/etc/hostname}", "t}\\input{x"):
        with pytest.raises(T.ReportError, match="table name"):
            T.render_tex(T.build_table({**_spec(tmp_path), "name": bad}))
        with pytest.raises(T.ReportError, match="table name"):
            T.check_spec({**_spec(tmp_path), "name": bad})
        with pytest.raises(T.ReportError, match="table name"):
            P.resolve_table(bad, {"caption": "c", "groups": [], "rows": []}, _config())
    layout = tmp_path / "tables.yaml"
    layout.write_text(yaml.safe_dump({"t\n\\input{/etc/hostname}": {"caption": "c", "groups": [], "rows": []}}))
    with pytest.raises(T.ReportError, match="table name"):
        P.load_tables(layout)


def test_user_template_is_sandboxed(tmp_path):
    t = T.build_table(_spec(tmp_path))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.tex.j2"
    evil.write_text("<< cycler.__init__.__globals__.os.system('touch " + str(marker) + "') >>\n"
                    "<< ''.__class__.__mro__[1].__subclasses__() >>\n")
    with pytest.raises(T.ReportError, match="sandbox"):
        T.render_tex(t, evil)
    assert not marker.exists()
    # through the CLI: one line, exit 2, no output, no command run
    spec = json.dumps(_spec(tmp_path))
    args = ["report", "table", "--spec-json", spec, "--tex", str(tmp_path / "o.tex"), "--csv", str(tmp_path / "o.csv")]
    assert greg_main([*args, "--template", str(evil)]) == 2
    assert not marker.exists() and not (tmp_path / "o.tex").exists()
    # the shipped template renders in the sandbox, and a plain user template too
    assert greg_main(args) == 0 and r"\label{tab:tableT}" in (tmp_path / "o.tex").read_text()
    plain = tmp_path / "plain.tex.j2"
    plain.write_text("<< name >>: << caption | tex >> << rows | length >>\n")
    assert T.render_tex(t, plain) == "tableT: Test 100\\% table 5\n"


LATEX_PRESENT = pytest.mark.skipif(not shutil.which("pdflatex") and not os.environ.get("GREG_REQUIRE_LATEX"),
                                   reason="pdflatex not installed (CI installs it: .ci/run)")


@LATEX_PRESENT
def test_hostile_label_set_compiles(tmp_path):
    """Tables and `greg dg table` with every LaTeX special character in labels, captions, sections, notes,
    group / algorithm / dataset names compile (.ci/compile_tables.py), and print no hostname."""
    from greg.dg.cli import render_table as dg_table

    assert shutil.which("pdflatex"), "GREG_REQUIRE_LATEX is set but pdflatex is not on PATH"
    out = tmp_path / "tables"
    out.mkdir()
    table = T.build_table(_hostile_spec(tmp_path))
    (out / "hostile.tex").write_text(T.render_tex(table))
    runs = [{"dataset": "ds_" + HOSTILE, "algorithm": "alg_" + HOSTILE, "n_restarts": 2, "path": "p",
             **{m: {"mean": 50.0, "std": 1.0} for m in ("train_acc", "val_acc", "test_acc")}}]
    (out / "hostile_dg.tex").write_text(dg_table(runs, caption="Cap " + HOSTILE)[0])
    r = subprocess.run([sys.executable, str(ROOT / ".ci/compile_tables.py"), str(out)], capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0 and "2/2 tables compile" in r.stderr, r.stderr


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("row,match", [
    ("mean,100,50,90,10,20,1e308,1,1", r"line 3: auroc is 1e308, outside 0-100"),
    ("mean,100,50,90,10,20,150,1,1", r"line 3: auroc is 150, outside 0-100"),
    ("mean,100,50,90,-20,20,90,1,1", r"line 3: fpr95_idpos is -20, outside 0-100"),
    ("mean,100,50,90,10,20,inf,1,1", r"line 3: auroc is inf, outside 0-100"),
    ("mean,100,50,90,10,20,abc,1,1", r"line 3: auroc is 'abc', not a number"),
    ("mean,-3,50,90,10,20,90,1,1", r"line 3: n_id is -3, not a sample count"),
    ("x,100,50,90,10,20,90,1,1", r"line 3: a second row for OOD set 'x'"),
])
def test_metrics_csv_bad_values_are_refused_with_file_and_line(tmp_path, row, match):
    p = _write(tmp_path / "m.csv", HEADER + "x,100,50,90,10,20,90,1,1\n" + row + "\n")
    with pytest.raises(T.ReportError, match=rf"m\.csv, {match}"):
        T.read_metrics_csv(p)


def test_metrics_csv_nan_stays_a_flagged_cell(tmp_path):
    p = _write(tmp_path / "m.csv", HEADER + "mean,100,50,90,10,20,nan,1,1\n")
    assert math.isnan(T.read_metrics_csv(p)["mean"]["auroc"])


@pytest.mark.parametrize("spec_json,match", [
    ("[]", "--spec-json: spec: expected a JSON object, got list"),
    ("3", "--spec-json: spec: expected a JSON object, got int"),
    ("{", "--spec-json: not valid JSON"),
    (('{"name": "t", "caption": "c", "fpr": "fpr95_idpos", "metrics": ["auroc"], "digits": 1, "show_std": true, '
     '"groups": [{"label": "g", "columns": [{"ood": "mean", "label": "m"}]}], "rows": [{"label": "r", '
     '"cells": 5}]}'), r"rows\[0\]\.cells: expected list, got int"),
    (('{"name": "t", "caption": "c", "fpr": "fpr95_idpos", "metrics": ["auroc"], "digits": 1, "show_std": true, '
     '"groups": [{"label": "g", "columns": [{"ood": "mean", "label": "m"}]}], "rows": [{"label": "r", '
     '"cells": [{"files": "x", "dataset": "d", "arch": "a", "run": "r", "detector": "d"}]}]}'),
     r"rows\[0\]\.cells\[0\]\.files: expected list, got str"),
])
def test_report_table_bad_spec_is_one_line(tmp_path, capsys, spec_json, match):
    rc = greg_main(["report", "table", "--spec-json", spec_json, "--tex", str(tmp_path / "o.tex"),
                    "--csv", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("greg report: "), err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "o.tex").exists()


def test_fig3_run_config_that_is_not_a_mapping(tmp_path, capsys):
    log = _write(tmp_path / "run" / "metrics.jsonl", '{"step": 0, "energy": 1.0, "score_grad_norm": 2.0}\n')
    for doc in ("[1, 2]\n", "7\n", "method: [1]\n", "method: {hparams: 3}\n"):
        (tmp_path / "run" / "config.yaml").write_text(doc)
        rc = greg_main(["report", "fig3", "--run", f"E={log}", "--out", str(tmp_path / "f.pdf")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "config.yaml: expected a run config" in err, (doc, err)
    assert greg_main(["report", "fig3", "--run", f"={log}", "--out", str(tmp_path / "f.pdf")]) == 2
    assert "empty LABEL" in capsys.readouterr().err


def test_figure_labels_that_cannot_pass_as_label_path_are_refused():
    # `greg report fig3/fig4/fig-sam` take LABEL=PATH[,PATH...]: the workflow schema's label rule
    schema = ROOT / "workflow/schemas/config.schema.yaml"
    fig3 = {"dataset": "cifar10", "arch": "densenet100"}
    cfg = {**_config(), "figures": {"fig3": {**fig3, "runs": {"GReg (ours)": "greg"}}}}
    P.check_workflow_config(cfg, schema)
    for label in ("m=1", "a,b", "two\nlines", " ", ""):
        with pytest.raises(T.ReportError, match=r"^config figures\.fig3\.runs: "):
            P.check_workflow_config({**cfg, "figures": {"fig3": {**fig3, "runs": {label: "greg"}}}}, schema)


def test_fig4_says_on_the_figure_that_it_pools_the_seeds(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    dirs = []
    for s in range(3):
        d = tmp_path / f"s{s}"
        (d / "scores").mkdir(parents=True)
        np.savez(d / "scores" / "id.npz", scores=rng.normal(-10, 1, 20))
        np.savez(d / "scores" / "svhn.npz", scores=rng.normal(-4, 1, 20))
        dirs.append(str(d))
    seen = {}
    monkeypatch.setattr(F, "_save_figure", lambda fig, out: seen.setdefault("title", fig._suptitle.get_text()))
    F.plot_fig4({"GReg": dirs, "Energy": dirs}, "svhn", tmp_path / "f.pdf")
    assert seen["title"] == "Each panel pools the per-sample scores of 3 seeds' models"
    assert F.pooled_note({"a": dirs[:1]}) == "Per-sample scores of one model (one seed) per panel"


# ----------------------------------------------------------------------------------- assumption marks
def _full_and_smoke():
    full = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    return full, _overlay(full, yaml.safe_load((ROOT / "config/smoke.yaml").read_text()))


def test_assumption_marks_follow_the_declared_recipes():
    """config/tables.yaml `assumptions`, resolved on the full config: a cell carries a key when its run (or,
    for a fine-tuned run, its CE model) is declared for the cell's paper dataset and arch."""
    full, _ = _full_and_smoke()
    path = ROOT / "config/tables.yaml"
    layouts, assumptions = P.load_tables(path), P.load_assumptions(path)
    assert set(assumptions) == {"ce_resnet_wrn", "imagenet_ce", "imagenet_oe_energy", "imagenet_adam_wd", "oe_grad",
                                "posthoc_arch_settings"}
    keys = lambda res: {(r["label"], g["label"]): c["assumptions"]
                        for r in res["rows"] for g, c in zip(res["groups"], r["cells"])}
    t1 = keys(P.resolve_table("table1", layouts["table1"], full, assumptions=assumptions))
    assert t1[("MSP", "ResNet")] == t1[("MSP", "WRN")] == ["ce_resnet_wrn"]
    assert t1[("MSP", "DenseNet")] == []  # the released checkpoint is imported
    assert t1[("GReg", "WRN")] == ["ce_resnet_wrn"]  # fine-tunes the CE model
    assert t1[("OpenMix", "ResNet")] == []  # trains from scratch
    t3 = keys(P.resolve_table("table3", layouts["table3"], full, assumptions=assumptions))
    g = "OOD Datasets"
    assert t3[("MSP", g)] == ["imagenet_ce"] and t3[("OE", g)] == ["imagenet_ce", "imagenet_oe_energy"]
    assert t3[("GReg", g)] == ["imagenet_ce", "imagenet_adam_wd"]
    assert t3[("GReg+", g)] == ["imagenet_ce", "imagenet_adam_wd"]  # ImageNet GReg+ fine-tunes (init_by_dataset)
    assert t3[("DOS", g)] == []
    t4 = P.resolve_table("table4", layouts["table4"], full, assumptions=assumptions)
    assert keys(t4)[("OE + Grad", "CIFAR-10")] == ["oe_grad"] and keys(t4)[("OE", "CIFAR-10")] == []
    assert list(t4["assumptions"]) == ["oe_grad"]  # only the notes a table needs


def test_posthoc_settings_on_archs_their_code_does_not_run_are_marked_per_detector():
    """DICE's and LINe's released settings exist for DenseNet-101 (CIFAR) and ResNet-50 (ImageNet) only: their
    cells on ResNet-18, WRN-40-2 and DenseNet-121 carry `posthoc_arch_settings`, no other detector's cell does
    (the entry's `detectors` filter), and the DenseNet-100 cells stay unmarked."""
    full, _ = _full_and_smoke()
    path = ROOT / "config/tables.yaml"
    layouts, assumptions = P.load_tables(path), P.load_assumptions(path)
    key = "posthoc_arch_settings"
    for name in ("table1", "table2"):
        res = P.resolve_table(name, layouts[name], full, assumptions=assumptions)
        marked = {(r["label"], g["label"]) for r in res["rows"] for g, c in zip(res["groups"], r["cells"])
                  if key in c["assumptions"]}
        assert marked == {("Dice", "ResNet"), ("Dice", "WRN"), ("LiNe", "ResNet"), ("LiNe", "WRN")}, name
        cells = {(r["label"], g["label"]): c["assumptions"] for r in res["rows"]
                 for g, c in zip(res["groups"], r["cells"])}
        assert cells[("LiNe", "WRN")] == cells[("Dice", "ResNet")] == ["ce_resnet_wrn", key]
        assert cells[("ReAct", "ResNet")] == ["ce_resnet_wrn"] and cells[("LiNe", "DenseNet")] == []
    t3 = P.resolve_table("table3", layouts["table3"], full, assumptions=assumptions)
    cells = {r["label"]: r["cells"][0]["assumptions"] for r in t3["rows"]}
    assert {lab for lab, a in cells.items() if key in a} == {"DICE", "LiNe"}
    assert cells["LiNe"] == ["imagenet_ce", key] and cells["ReAct"] == ["imagenet_ce"]
    for name in ("table8", "table9"):  # one block of rows per network
        res = P.resolve_table(name, layouts[name], full, assumptions=assumptions)
        marked = {(r["section"], r["label"]) for r in res["rows"] if key in r["cells"][0]["assumptions"]}
        assert marked == {(n, d) for n in ("ResNet", "WRN") for d in ("DICE", "LiNe")}, name


def test_smoke_tables_show_the_assumption_marks(tmp_path):
    """The smoke run (aliased names) renders the marks: on the row label where the whole row rests on one,
    else on the cell; the note under the table; the CSV names the key."""
    _, smoke = _full_and_smoke()
    smoke["results"] = str(tmp_path / "res")
    path = ROOT / "config/tables.yaml"
    layouts, assumptions = P.load_tables(path), P.load_assumptions(path)
    rendered = {}
    for name in ("table1", "table3", "table4"):
        res = P.resolve_table(name, layouts[name], smoke, assumptions=assumptions)
        for f in P.table_inputs(res):
            oods = smoke["datasets"]["tiny"]["ood"] + ["mean"]
            write_metrics(Path(f), {o: (10.0, 20.0, 90.0) for o in oods})
        table = T.build_table(res)
        rendered[name] = (T.render_tex(table), list(csv.DictReader(io.StringIO(T.render_csv(table)))))
    tex, rows = rendered["table4"]
    assert r"OE + Grad$^{\dagger}$ &" in tex and r"$^{\dagger}$ Assumption: OE + Grad: OE's recipe" in tex
    assert {r["assumptions"] for r in rows if r["row"] == "OE + Grad"} == {"oe_grad"}
    assert {r["assumptions"] for r in rows if r["row"] != "OE + Grad"} == {""}
    # the smoke GReg+ stands in for ImageNet's, which fine-tunes the CE model: the same marks as the full run
    tex, rows = rendered["table3"]
    assert r"GReg+$^{\dagger,\S}$ &" in tex and r"OE$^{\dagger,\ddagger}$ &" in tex and "\nDOS &" in tex
    tex, rows = rendered["table1"]
    msp = next(ln for ln in tex.splitlines() if ln.startswith("MSP"))
    # ResNet and WRN cells marked, the DenseNet ones (imported checkpoint) not: marks on the cells
    assert msp.startswith("MSP &") and msp.count(r"$^{\dagger}$") == 4
    assert r"$^{\dagger}$ Assumption: the CE model of ResNet-18 and WRN-40-2" in tex
    assert {(r["group"], r["assumptions"]) for r in rows if r["row"] == "MSP"} == {
        ("ResNet", "ce_resnet_wrn"), ("WRN", "ce_resnet_wrn"), ("DenseNet", "")}
    # LiNe's ResNet and WRN cells rest on the CE model and on its settings used off their network
    line = next(ln for ln in tex.splitlines() if ln.startswith("LiNe"))
    assert line.startswith("LiNe &") and line.count(r"$^{\dagger,\ddagger}$") == 4 and line.count("$^{") == 4
    assert r"$^{\ddagger}$ Assumption: DICE and LINe use their released per-dataset settings" in tex
    assert {(r["group"], r["assumptions"]) for r in rows if r["row"] == "LiNe"} == {
        ("ResNet", "ce_resnet_wrn;posthoc_arch_settings"), ("WRN", "ce_resnet_wrn;posthoc_arch_settings"),
        ("DenseNet", "")}


def test_assumptions_file_is_checked(tmp_path):
    p = tmp_path / "t.yaml"
    for doc, match in (({"assumptions": [1]}, "expected a mapping"),
                       ({"assumptions": {"a": {"note": "n"}}}, "'note' and 'runs'"),
                       ({"assumptions": {"a": {"note": "n", "runs": ["x"], "arch": ["y"]}}}, r"assumptions\.a\.arch"),
                       ({"assumptions": {"a": {"note": "n", "runs": ["x"], "detectors": "line"}}},
                        r"assumptions\.a\.detectors: allowed keys: .*detectors \(lists"),
                       ({"assumptions": {"a b": {"note": "n", "runs": ["x"]}}}, "assumption key")):
        p.write_text(yaml.safe_dump(doc))
        with pytest.raises(T.ReportError, match=match):
            P.load_assumptions(p)


# ---------------------------------------------------------------------------------------- the demo table
def test_separated_best_needs_a_gap_beyond_the_spread():
    V = T.Value
    # AUROC (higher better): 90 +- 1 vs 87 +- 1: gap 3 > 2 -> bold; 90 +- 2 vs 87 +- 1.5: gap 3 < 3.5 -> none
    rows = [[V(90.0, 1.0, 3)], [V(87.0, 1.0, 3)], [V(50.0, 0.0, 3)]]
    T._mark_separated(rows, 0, True, 2)
    assert [r[0].style for r in rows] == ["best", "", ""]
    rows = [[V(90.0, 2.0, 3)], [V(87.0, 1.5, 3)]]
    T._mark_separated(rows, 0, True, 2)
    assert [r[0].style for r in rows] == ["", ""]
    # FPR95 (lower better): 10 +- 0.5 vs 12 +- 0.5 -> bold 10; an n/a cell never counts
    rows = [[V(12.0, 0.5, 3)], [V(None)], [V(10.0, 0.5, 3)]]
    T._mark_separated(rows, 0, False, 2)
    assert [r[0].style for r in rows] == ["", "", "best"]


def test_demo_table_is_the_demos_own(tmp_path):
    demo = _overlay(yaml.safe_load((ROOT / "config/config.yaml").read_text()),
                    yaml.safe_load((ROOT / "config/demo.yaml").read_text()))
    demo["results"] = str(tmp_path / "res")
    layouts = P.load_tables(ROOT / demo["tables"])
    res = P.resolve_table("table_demo", layouts["table_demo"], demo)
    assert res["substitutes"] == [] and res["best"] == "separated"
    assert [g["header"] for g in res["groups"]] == ["OOD test sets", "ID accuracy"]
    oods = demo["datasets"]["tiny_m"]["ood"]
    assert [c["label"] for c in res["groups"][0]["columns"]] == ["Textures", "Faces", "Photos", "Gaussian",
                                                                 "Uniform", "Average"]
    for k, f in enumerate(P.table_inputs(res)):
        write_metrics(Path(f), {o: (10.0 + k, 20.0, 90.0 - k) for o in oods + ["mean"]}, acc=95.0 - k % 3)
    table = T.build_table(res)
    assert [m for _, _, m in table.columns][-1] == "id_acc" and len(table.columns) == 2 * (len(oods) + 1) + 1
    tex = T.render_tex(table)
    caption = next(ln for ln in tex.splitlines() if ln.startswith(r"\caption{"))
    assert caption.startswith(r"\caption{CPU demo, not a paper result") and "Smoke" not in tex
    assert "stand-in" not in tex and caption.count("std") == 2  # "Mean±std over seeds" + the bold rule, once each
    assert "does not overlap the runner-up" in caption and r"\underline" not in tex
    assert r"ID Acc.$\uparrow$" in tex
    assert "table_demo" not in P.paper_tables(ROOT / "config/paper_results.yaml")  # so no _vs_paper.tex


@pytest.mark.parametrize("overlay", [None, "smoke", "demo"])
def test_every_resolved_spec_passes_the_cli_check(overlay):
    """What the workflow hands `greg report table --spec-json` (JSON of greg.plan.resolve_table) passes
    greg.tables.check_spec, for the paper grid, the smoke and the demo configs."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    if overlay:
        cfg = _overlay(cfg, yaml.safe_load((ROOT / f"config/{overlay}.yaml").read_text()))
    layout = ROOT / cfg["tables"]
    for name, spec in P.load_tables(layout).items():
        res = json.loads(json.dumps(P.resolve_table(name, spec, cfg, assumptions=P.load_assumptions(layout))))
        assert T.check_spec(res, name) == res
