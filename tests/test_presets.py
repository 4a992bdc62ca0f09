"""Config assertions: the method presets follow the paper and the released code.

Each test names the choice it pins; the sources are cited in the preset files' comments."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from greg.detectors import DETECTORS
from greg.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text())


def without(cfg: dict, key: str) -> dict:
    out = {**cfg, "method": {**cfg["method"], "hparams": dict(cfg["method"]["hparams"])}}
    out["method"]["hparams"].pop(key)
    return out


def test_paper_grid_resnet18_uses_the_imagenet_stem():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert cfg["archs"]["resnet18"] == {"model": "resnet18", "kwargs": {"stem": "imagenet"}}


def test_greg_aux_batch_equals_id_batch():
    # size_factor_sampled_ood (1) x batch_size: 64 outliers per 64 ID
    cfg = preset("greg")
    assert cfg["data"]["batch_size"] == cfg["data"]["aux_batch_size"] == 64


@pytest.mark.parametrize("base,grad", [("poem", "poem_grad"), ("oe", "oe_grad")])
def test_table4_pairs_differ_only_in_lambda_grad(base, grad):
    a, b = preset(base), preset(grad)
    assert a["method"]["hparams"].get("lambda_grad", 0.0) == 0.0
    assert b["method"]["hparams"]["lambda_grad"] == 1.0
    a["method"]["hparams"].setdefault("lambda_grad", 0.0)
    assert without(a, "lambda_grad") == without(b, "lambda_grad")  # data, optim, schedule, epochs, hparams


def test_poem_released_recipe():
    cfg = preset("poem")
    assert cfg["optim"]["weight_decay"] == 1.0e-4 and cfg["optim"]["nesterov"] is True
    assert cfg["schedule"] == {"name": "multistep", "milestones": [50, 75, 90], "gamma": 0.1}
    assert cfg["data"]["aux_batch_size"] == 8 * cfg["method"]["hparams"]["n_selected"]  # 400K scored, 50K kept


def test_oe_grad_trains_with_the_default_msp_margins_it_labels_an_assumption(monkeypatch):
    """The preset sets no MSP margins, so a training step's gradient term uses grad_reg.DEFAULT_MARGINS'
    (-0.9, -0.5): the choice its header comment declares an assumption."""
    from greg.methods import grad_reg
    from tests.nets import TinyNet

    seen, real = [], grad_reg.resolve_margins
    monkeypatch.setattr(grad_reg, "resolve_margins", lambda *a: seen.append(real(*a)) or seen[-1])
    torch.manual_seed(0)
    batch = {"x_id": torch.randn(4, 3, 8, 8), "y_id": torch.tensor([0, 1, 2, 0]), "x_aux": torch.randn(4, 3, 8, 8)}
    terms = METHODS.get("oe")(**preset("oe_grad")["method"]["hparams"]).compute_loss(TinyNet(), batch)
    assert seen == [(-0.9, -0.5)] and float(terms["grad"]) > 0
    assert "ASSUMPTION: the MSP margins" in (ROOT / "config" / "methods" / "oe_grad.yaml").read_text()


def test_dos_schedule_and_weight_decay():
    cfg = preset("dos")
    assert cfg["optim"]["weight_decay"] == 1.0e-4
    epochs = cfg["train"]["epochs"]
    assert cfg["schedule"]["milestones"] == [int(epochs * f) for f in (0.5, 0.75, 0.9)]
    assert cfg["schedule"]["name"] == "multistep" and cfg["schedule"]["gamma"] == 0.1


def test_openmix_released_schedule_and_detector():
    cfg = preset("openmix")
    assert cfg["train"]["epochs"] == 200 and cfg["optim"]["nesterov"] is False
    assert cfg["schedule"] == {"name": "multistep", "milestones": [100, 150], "gamma": 0.1}
    assert "msp_known" in DETECTORS.names()


def test_ce_released_train_py_recipe():
    cfg = preset("ce")
    assert cfg["data"]["batch_size"] == 64 and cfg["train"]["epochs"] == 100
    assert cfg["optim"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1.0e-4}
    assert cfg["schedule"]["name"] == "cosine"
    assert cfg["schedule"]["lr_min_ratio"] == pytest.approx(1e-6 / cfg["optim"]["lr"])  # LambdaLR to 1e-6


@pytest.mark.parametrize("name", ["greg_plus", "energy_clustering"])
def test_greg_plus_sampling_as_released(name):
    hp = preset(name)["method"]["hparams"]
    assert hp["n_clusters"] == 64 and hp["n_selected"] == 128 and hp["two_way"] is True
    assert hp["per_cluster"] is None  # released rule: n_selected // (2 k)
    assert hp["kmeans_kwargs"]["n_init"] == 3 and hp["kmeans_kwargs"]["max_iter"] == 300
    assert METHODS.create(name, **hp).sampler.picks_per_cluster() == 1
    assert METHODS.create(name, **{**hp, "n_clusters": 16}).sampler.picks_per_cluster() == 4


def test_torch_kmeans_sklearn_semantics_runs_with_sklearn_trial_count():
    from greg.sampling import kmeans

    x = torch.nn.functional.normalize(torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    kw = preset("greg_plus")["method"]["hparams"]["kmeans_kwargs"]
    res = kmeans(x, 16, backend="torch", seed=0, **kw)
    assert res.labels.shape == (96,) and res.labels.unique().numel() == 16


@pytest.mark.parametrize("run", ["greg_plus", "dos"])
def test_imagenet_aux_pool_600k_per_epoch(run):
    # paper Sec. 6.1 "Sampling Details": 600K random images of the 990 other classes per epoch; CIFAR: all 300K
    v = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["variants"][run]
    assert v["set_by_dataset"]["imagenet10"]["data.aux_pool_per_epoch"] == 600_000
    assert "aux_pool_per_epoch" not in str(v.get("set", {})) and set(v["set_by_dataset"]) == {"imagenet10"}
    assert preset(run)["data"]["aux_batch_size"] == "ratio"  # candidates per step follow the pool


def test_dos_kmeans_as_the_papers_dos_runs():
    # n_init 3 (o4lc/Greg-OOD train_sea.py --n_init default, run by Scripts/cifar10ScriptDOS.sh), sklearn's
    # max_iter / tol, as GReg+
    hp = preset("dos")["method"]["hparams"]
    m = METHODS.create("dos", **hp)
    gp = preset("greg_plus")["method"]["hparams"]["kmeans_kwargs"]
    assert m.kmeans_kwargs() == gp == {"n_init": 3, "max_iter": 300, "tol": 1.0e-4, "n_local_trials": None}
    assert METHODS.get("dos").defaults["kmeans_n_init"] == 3
    assert m.sampler.picks_per_cluster() == 1 and not m.sampler.two_way


def test_dos_candidate_window_as_the_papers_dos_runs():
    # o4lc/Greg-OOD train_sea.py --spt 16 --ept 384 (its defaults; Scripts/cifar10ScriptDOS.sh keeps them)
    hp = preset("dos")["method"]["hparams"]
    assert (hp["window_start"], hp["window_end"]) == (16, 384)
    assert METHODS.create("dos", **hp).sampler.window == (16, 384)
    assert "window" not in str(preset("greg_plus")["method"]["hparams"])  # GReg+: --spt 0 --ept 10000


def test_imagenet_dos_as_the_released_command():
    # o4lc/Greg-OOD README@451d2a0 DOS command: batch 64, Adam (train_sea.py for --id imagenet) at LR 0.01,
    # no weight decay, 100 epochs, 16/384 window, k = min(64, batch) clusters, batch picks
    from greg import config as run_config
    from greg import plan

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    args = plan.train_args(cfg, "imagenet10", "densenet121", "dos", 2)
    files = [v for k, v in itertools.pairwise(args) if k == "--config"]
    sets = [v for k, v in itertools.pairwise(args) if k == "--set"]
    rc = run_config.load_config([str(ROOT / f) for f in files], sets)
    assert rc["data"]["batch_size"] == 64 and rc["data"]["aux_pool_per_epoch"] == 600_000
    assert (rc["optim"]["name"], rc["optim"]["lr"], rc["optim"]["weight_decay"]) == ("adam", 0.01, 0.0)
    assert rc["train"]["epochs"] == 100 and rc["schedule"]["milestones"] == [50, 75, 90]
    hp = rc["method"]["hparams"]
    assert hp["n_clusters"] == min(64, 64) and hp["n_selected"] == 64
    assert (hp["window_start"], hp["window_end"]) == (16, 384)
    assert "init.checkpoint" not in " ".join(sets)  # from scratch (no --finetune in the command)


def test_table4_oe_grad_row_carries_its_margins_as_an_assumption_mark():
    from greg.methods.grad_reg import DEFAULT_MARGINS

    assert preset("oe_grad")["method"]["hparams"].get("grad_m_in") is None  # so DEFAULT_MARGINS["msp"] apply
    marks = yaml.safe_load((ROOT / "config" / "tables.yaml").read_text())["assumptions"]
    note = " ".join(marks["oe_grad"]["note"].split())
    m_in, m_out = DEFAULT_MARGINS["msp"]
    assert marks["oe_grad"]["runs"] == ["oe_grad"]
    assert f"m_in = {m_in}" in note and f"m_out = {m_out}" in note
