"""``margins: auto`` (greg.methods.margins): the quantile rule, the method option, the trainer hook and resume."""

import json
import signal

import numpy as np
import pytest
import torch

from greg import config, data, io, methods, models
from greg.errors import EXIT_PREEMPTED
from greg.methods import margins
from greg.methods.energy import energy_loss
from greg.trainer import Trainer
from tests.nets import IdentityNet


def test_quantile_rule_exact_values():
    # 101 values 0..100: the 5 % quantile (linear interpolation) is 5.0; aux 100..200: the 95 % one is 195.0
    assert margins.auto_margins(np.arange(101.0), np.arange(100.0, 201.0)) == (5.0, 195.0)
    # other quantiles, torch input: 0.25 of 0..4 is 1.0; 0.5 of [10, 20] is 15.0
    assert margins.auto_margins(torch.arange(5.0), torch.tensor([10.0, 20.0]), (0.25, 0.5)) == (1.0, 15.0)


def test_quantile_rule_moves_with_a_shift_of_all_energies():
    rng = np.random.default_rng(0)
    e_id, e_aux = rng.normal(-8, 1, 300), rng.normal(-3, 1, 200)
    m_in, m_out = margins.auto_margins(e_id, e_aux)
    m_in2, m_out2 = margins.auto_margins(e_id - 10.0, e_aux - 10.0)
    assert m_in2 == pytest.approx(m_in - 10.0) and m_out2 == pytest.approx(m_out - 10.0)


@pytest.mark.parametrize(
    "e_id, e_aux, match",
    [
        ([0.0, 1.0], [], "no auxiliary energies"),
        ([], [0.0], "no ID energies"),
        ([0.0, np.nan], [1.0], "non-finite ID"),
        ([5.0, 6.0], [1.0, 2.0], "auxiliary energies lie below"),  # m_in 5.05 >= m_out 1.95
    ],
)
def test_quantile_rule_refuses_bad_input(e_id, e_aux, match):
    with pytest.raises(ValueError, match=match):
        margins.auto_margins(e_id, e_aux)


@pytest.mark.parametrize(
    "hp, match",
    [
        ({"margins": "quantile"}, "margins must be one of"),
        ({"margin_quantiles": [0.1]}, "margin_quantiles"),
        ({"margin_quantiles": [0.1, 1.5]}, "margin_quantiles"),
        ({"margin_quantiles": "0.1,0.9"}, "margin_quantiles"),
    ],
)
def test_method_option_is_validated(hp, match):
    with pytest.raises(ValueError, match=match):
        methods.create("greg", **hp)


def test_paper_presets_keep_fixed_margins():
    for name in ("energy", "greg", "greg_plus", "poem"):
        m = methods.create(name)
        assert m.hparams["margins"] == "fixed" and m.hparams["m_in"] == -25.0 and m.hparams["m_out"] == -7.0
        assert m.setup_record() is None and "margins" not in m.state_dict()


def test_auto_method_refuses_to_train_before_the_margins_are_fitted():
    m = methods.create("energy", margins="auto")
    batch = {"x_id": torch.zeros(2, 3), "y_id": torch.zeros(2, dtype=torch.long), "x_aux": torch.zeros(2, 3)}
    with pytest.raises(RuntimeError, match="no margins were fitted"):
        m.compute_loss(IdentityNet(), batch)


def test_applied_margins_drive_the_energy_loss():
    m = methods.create("energy", margins="auto", lambda_S=1.0)
    margins.apply(m, {"m_in": -2.0, "m_out": -1.0})
    assert (m.hparams["m_in"], m.hparams["m_out"]) == (-2.0, -1.0)
    assert m.setup_record() == m.state_dict()["margins"] == {"m_in": -2.0, "m_out": -1.0}
    # IdentityNet: logits = x. ID rows: logits 0,0,0 -> S = -log 3 = -1.0986; aux row logits ln 2 -> S = -ln 6
    x_id, x_aux = torch.zeros(1, 3), torch.full((1, 3), float(np.log(2.0)))
    out = m.compute_loss(
        IdentityNet(), {"x_id": x_id, "y_id": torch.zeros(1, dtype=torch.long), "x_aux": x_aux}
    )
    s_id, s_aux = -np.log(3.0), -np.log(6.0)
    expected_ls = (s_id + 2.0) ** 2 + (-1.0 - s_aux) ** 2  # both hinges active
    assert float(out["energy"]) == pytest.approx(expected_ls, rel=1e-6)
    assert float(out["energy"]) == pytest.approx(
        float(energy_loss(torch.tensor([s_id]), torch.tensor([s_aux]), -2.0, -1.0))
    )
    with pytest.raises(ValueError, match="m_in < m_out"):
        margins.apply(m, {"m_in": 0.0, "m_out": 0.0})
    with pytest.raises(ValueError, match="margins is 'fixed'"):
        margins.apply(methods.create("energy"), {"m_in": -2.0, "m_out": -1.0})


def test_subsample_indices():
    assert margins.subsample_indices(5, None, 0) == [0, 1, 2, 3, 4]
    assert margins.subsample_indices(5, 10, 0) == [0, 1, 2, 3, 4]
    idx = margins.subsample_indices(100, 7, 3)
    assert idx == sorted(set(idx)) and len(idx) == 7 and idx == margins.subsample_indices(100, 7, 3)


# -- trainer hook ---------------------------------------------------------------------------------------

RUN = {
    "seed": 3,
    "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
    "data": {"id": "tiny", "aux": "tiny_aux", "batch_size": 16, "aux_batch_size": 16},
    "optim": {"name": "sgd", "lr": 0.01},
    "train": {"epochs": 1, "max_steps": 4, "checkpoint_every": 100, "grad_norm_every": 0, "progress": False},
}


def _cfg(tmp_path, method, hparams, **extra):
    cfg = config.deep_merge(config.DEFAULTS, {**RUN, "method": {"name": method, "hparams": hparams}, **extra})
    cfg["data"]["root"] = str(tmp_path / "data")
    config.validate(cfg)
    return cfg


@pytest.fixture
def start_ckpt(tmp_path):
    """A 3-step CE model: the starting point of the fine-tuning runs."""
    out = tmp_path / "ce"
    assert Trainer(_cfg(tmp_path, "ce", {}, train={**RUN["train"], "max_steps": 3}), out, "cpu").run() == 0
    return out / "final.pt"


def test_trainer_fits_margins_before_step_0_and_records_them(tmp_path, start_ckpt, capsys):
    cfg = _cfg(tmp_path, "greg", {"margins": "auto"}, init={"checkpoint": str(start_ckpt)})
    assert Trainer(cfg, tmp_path / "g", "cpu").run() == 0
    assert "margins: auto: m_in = " in capsys.readouterr().err
    # independent recomputation: the same quantiles of the starting model's eval-mode energies
    model, _ = models.load_checkpoint(start_ckpt, "cpu")
    e = []
    for name, kw in (("tiny", {}), ("tiny_aux", {"id_dataset": "tiny"})):
        ds = data.load(name, "train", tmp_path / "data", **kw)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            e.append((-torch.logsumexp(model.eval()(x), dim=1)).numpy())
    want_in, want_out = float(np.quantile(e[0], 0.05)), float(np.quantile(e[1], 0.95))
    meta = io.safe_torch_load(tmp_path / "g" / "final.pt")["meta"]["setup"]
    state = io.safe_torch_load(tmp_path / "g" / "state.pt")["method"]["margins"]
    assert meta == state
    assert meta["m_in"] == pytest.approx(want_in, abs=1e-5) and meta["m_out"] == pytest.approx(
        want_out, abs=1e-5
    )
    assert (meta["n_id"], meta["n_aux"]) == (len(e[0]), len(e[1])) == (1297, 1000)
    # fixed margins record none
    cfg_fixed = _cfg(tmp_path, "greg", {}, init={"checkpoint": str(start_ckpt)})
    assert Trainer(cfg_fixed, tmp_path / "f", "cpu").run() == 0
    assert io.safe_torch_load(tmp_path / "f" / "final.pt")["meta"]["setup"] is None


def test_interrupted_auto_run_resumes_with_the_same_margins_and_weights(tmp_path, start_ckpt, monkeypatch):
    cfg = _cfg(tmp_path, "energy", {"margins": "auto"}, init={"checkpoint": str(start_ckpt)})
    ref = tmp_path / "ref"
    assert Trainer(cfg, ref, "cpu").run() == 0
    out = tmp_path / "cut"
    t = Trainer(cfg, out, "cpu")
    orig = t.method.compute_loss

    def compute_loss(model, batch):
        if t.step == 1:  # stop after step 2: state.pt holds the partly trained model
            t._stop_signal = signal.SIGTERM
        return orig(model, batch)

    monkeypatch.setattr(t.method, "compute_loss", compute_loss)
    assert t.run() == EXIT_PREEMPTED
    # refitting now would read the partly trained model: the resumed run must reuse the stored margins
    monkeypatch.setattr(margins, "fit_margins", lambda *a, **k: pytest.fail("margins refitted on resume"))
    assert Trainer(cfg, out, "cpu").run() == 0
    a, b = io.safe_torch_load(ref / "final.pt"), io.safe_torch_load(out / "final.pt")
    assert a["meta"]["setup"] == b["meta"]["setup"] is not None
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    la = [json.loads(x)["energy"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["energy"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_auto_margins_need_a_starting_model(tmp_path, capsys):
    from greg.cli import main

    argv = [
        "train",
        "--config",
        "config/methods/greg.yaml",
        "--config",
        "config/tiny.yaml",
        "--set",
        "method.hparams.margins=auto",
        "--set",
        f"data.root={tmp_path / 'data'}",
        "--set",
        "train.max_steps=1",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    assert "set init.checkpoint" in capsys.readouterr().err
