"""Post-hoc detector settings per (dataset, arch) from the workflow config (``detector_kwargs``), the opt-in
sweep of the released settings (``detector_sweep``), and their checks (greg.plan)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from greg import plan as P

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())

# The released per-dataset settings, written out by hand from the methods' run scripts:
# LINe demo-cifar.sh / demo-imagenet.sh, DICE demo-cifar.sh / demo-imagenet.sh.
EXPECTED = {
    ("cifar10", "line"): {"p_w": 90, "p_a": 90, "clip_threshold": 1.0},
    ("cifar100", "line"): {"p_w": 90, "p_a": 10, "clip_threshold": 1.0},
    ("imagenet10", "line"): {"p_w": 10, "p_a": 10, "clip_threshold": 0.8},
    ("cifar10", "dice"): {"p": 90},
    ("cifar100", "dice"): {"p": 90},
    ("imagenet10", "dice"): {"p": 70},
}


def _cells():
    return [(d, a) for g in CONFIG["grid"] for d in g["datasets"] for a in g["archs"]]


@pytest.mark.parametrize(("dataset", "arch"), _cells())
def test_resolved_detector_kwargs_per_dataset_and_arch(dataset, arch):
    for det in ("line", "dice"):
        assert P.detector_kwargs(CONFIG, dataset, arch, det) == EXPECTED[(dataset, det)]
        args = P.evaluate_detector_args(CONFIG, dataset, arch, det)
        assert args[:2] == ["--detector", det] and json.loads(args[3]) == EXPECTED[(dataset, det)]
    # a detector without settings keeps its defaults: no --detector-kwargs at all
    assert P.evaluate_detector_args(CONFIG, dataset, arch, "energy") == ["--detector", "energy"]
    assert P.detector_evals(CONFIG, dataset, arch, "line") == ["line"]  # no sweep unless opted in


def test_one_process_for_several_detectors_keys_the_kwargs_by_detector():
    args = P.evaluate_detector_args(CONFIG, "imagenet10", "densenet121", ["msp", "dice", "line"])
    assert args[:2] == ["--detector", "msp,dice,line"] and args[2] == "--detector-kwargs"
    assert json.loads(args[3]) == {"dice": EXPECTED[("imagenet10", "dice")], "line": EXPECTED[("imagenet10", "line")]}
    assert P.evaluate_detector_args(CONFIG, "cifar10", "wrn40_2", ["msp", "energy"]) == ["--detector", "msp,energy"]
    with pytest.raises(P.ReportError, match="each detector once"):
        P.evaluate_detector_args(CONFIG, "cifar10", "wrn40_2", ["line", "line"])


def test_arch_entry_wins_over_the_dataset_entry_and_evaluate_args_follow():
    cfg = copy.deepcopy(CONFIG)
    cfg["detector_kwargs"]["line"]["cifar10/resnet18"] = {"clip_threshold": None, "clip_percentile": 90.0}
    cfg["evaluate_args"] = ["--n-ood", "500"]
    P.check_detector_kwargs(cfg)
    assert P.detector_kwargs(cfg, "cifar10", "resnet18", "line") == {
        "p_w": 90, "p_a": 90, "clip_threshold": None, "clip_percentile": 90.0}
    assert P.detector_kwargs(cfg, "cifar10", "wrn40_2", "line") == EXPECTED[("cifar10", "line")]
    args = P.evaluate_detector_args(cfg, "cifar10", "resnet18", "line")
    assert args[-2:] == ["--n-ood", "500"] and json.loads(args[3])["clip_percentile"] == 90.0


def test_sweep_evaluates_every_released_setting_once_per_cell():
    cfg = {**CONFIG, "detector_sweep": ["line", "dice"]}
    P.check_detector_kwargs(cfg)
    assert len(P.sweep_settings(cfg, "line")) == 3 and len(P.sweep_settings(cfg, "dice")) == 2
    names = P.detector_evals(cfg, "cifar100", "densenet100", "line")
    # the cell's own setting keeps the plain directory; the two others get a tag each
    assert names == ["line", "line~clip_threshold1.0+p_a90+p_w90", "line~clip_threshold0.8+p_a10+p_w10"]
    assert P.detector_evals(cfg, "imagenet10", "densenet121", "dice") == ["dice", "dice~p90"]
    assert P.detector_evals(cfg, "cifar10", "resnet18", "energy") == ["energy"]
    got = {json.dumps(json.loads(P.evaluate_detector_args(cfg, "cifar100", "densenet100", n)[3]), sort_keys=True)
           for n in names}
    assert got == {json.dumps(s, sort_keys=True) for s in P.sweep_settings(cfg, "line")}
    with pytest.raises(P.ReportError, match="no setting"):
        P.evaluate_detector_args(cfg, "cifar10", "resnet18", "line~p_w5")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["detector_kwargs"].update(lyne={"cifar10": {}}), "unknown detector"),
    (lambda c: c["detector_kwargs"]["line"].update(cifar11={"p_w": 90}), "unknown dataset or arch"),
    (lambda c: c["detector_kwargs"]["line"].update({"cifar10/resnet19": {"p_w": 90}}), "unknown dataset or arch"),
    (lambda c: c["detector_kwargs"]["dice"].update(cifar10={"percentile": 90}), "unknown argument 'percentile'"),
    (lambda c: c["detector_kwargs"]["dice"].update(cifar10={"p": 100}), "p must be in"),
    (lambda c: c.update(detector_sweep=["energy"]), "at least two distinct settings"),
])
def test_bad_detector_settings_fail_naming_the_key(edit, match):
    cfg = copy.deepcopy(CONFIG)
    edit(cfg)
    with pytest.raises(P.ReportError, match=match):
        P.check_detector_kwargs(cfg)


def test_swept_table_cell_reports_the_best_setting_and_says_so():
    from greg import tables as T

    cfg = {**CONFIG, "detector_sweep": ["line"]}
    spec = P.load_tables(ROOT / "config" / "tables.yaml")["table1"]
    resolved = P.with_sweeps(P.resolve_table("table1", spec, cfg), cfg)
    assert "line: best of 3 settings per cell, chosen on the test set" in resolved["caption"]
    line = next(r for r in resolved["rows"] if r["label"] == "LiNe")
    dice = next(r for r in resolved["rows"] if r["label"] == "Dice")
    assert all("sweep" not in c for c in dice["cells"])
    cell = line["cells"][0]  # cifar10 / resnet18: own setting 90/90/1.0 first, then 90/10/1.0, 10/10/0.8
    assert list(cell["sweep"]) == ["line", "line~clip_threshold1.0+p_a10+p_w90", "line~clip_threshold0.8+p_a10+p_w10"]
    inputs = P.table_inputs(resolved)
    assert all(f in inputs for files in cell["sweep"].values() for f in files)
    # FPR95 by setting (per seed: setting value + seed index): the second setting is best on mean FPR95
    fpr = {"line": 40.0, "line~clip_threshold1.0+p_a10+p_w90": 30.0, "line~clip_threshold0.8+p_a10+p_w10": 35.0}

    def reader(path):
        parts = Path(path).parts
        name, seed = parts[-2], int(parts[-4].removeprefix("seed"))
        v = fpr.get(name, 50.0) + CONFIG["seeds"].index(seed)
        return {"mean": {"fpr95_idpos": v, "fpr95_oodpos": v, "auroc": 100 - v}}

    table = T.build_table(resolved, reader)
    _label, _, values = next(r for r in table.rows if r[0] == "LiNe")
    assert values[0].mean == pytest.approx(31.0) and values[1].mean == pytest.approx(69.0)  # seeds 0, 1, 2
    csv_rows = [r for r in T.render_csv(table).splitlines() if ",LiNe," in r]
    assert "line~clip_threshold1.0+p_a10+p_w90" in csv_rows[0]
    # without the opt-in nothing changes
    plain = P.resolve_table("table1", spec, CONFIG)
    assert P.with_sweeps(plain, CONFIG) is plain
