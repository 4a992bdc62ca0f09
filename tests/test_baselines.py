"""Training baselines of the paper's tables: POEM (+ Grad), OpenMix, DOS; GReg+ sampling ablations.

Loss values by hand or by an independent formula; DOS / POEM selections on hand-made candidates; exact
resume of the method states; a short CPU run of each on the tiny benchmark scored by ``greg evaluate``.
"""

from __future__ import annotations

import io
import json
import math
import signal

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from nets import FeatNet, IdentityNet

from greg import config, methods, trainer
from greg.errors import EXIT_PREEMPTED
from greg.io import safe_torch_load
from greg.methods.dos import absent_class_loss
from greg.methods.openmix import openmix_soft_targets, sample_beta, soft_cross_entropy
from greg.methods.poem import StatsWindow, blr_posterior_from_stats, boundary_select, thompson_sample


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------- registry


def test_registry_attributes_and_presets(tmp_path):
    expect = {"poem": (0, "energy"), "dos": (1, "absent_class"), "openmix": (1, "absent_class")}
    for name, (extra, det) in expect.items():
        m = methods.create(name)
        assert (m.extra_classes, m.detector, m.needs_aux) == (extra, det, True)
        assert "seed" in m.defaults  # the trainer derives one from the run seed
    over = ["data.id=tiny", "data.aux=tiny_aux"]
    for preset, name in [("poem", "poem"), ("poem_grad", "poem"), ("dos", "dos"), ("openmix", "openmix")]:
        cfg = config.load_config([f"config/methods/{preset}.yaml"], over)
        m = config.make_method(cfg)
        assert m.name == name
    poem_grad = config.make_method(config.load_config(["config/methods/poem_grad.yaml"], over))
    assert poem_grad.hparams["lambda_grad"] == 1.0 and poem_grad.hparams["grad_score"] == "energy"
    for bad in ({"n_clusters": 65}, {"n_selected": 0}):
        with pytest.raises(ValueError, match="n_clusters|n_selected"):
            methods.create("dos", **bad)
    for bad in ({"update_every": "step"}, {"noise_var": 0.0}, {"buffer_updates": 0}):
        with pytest.raises(ValueError):
            methods.create("poem", **bad)
    with pytest.raises(ValueError, match="alpha"):
        methods.create("openmix", alpha=0)


# ------------------------------------------------------------------------------------------------ POEM


def test_blr_posterior_matches_ridge_regression():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.where(torch.arange(30) < 15, -3.0, 3.0).double()
    mu, chol = blr_posterior_from_stats(z.T @ z, z.T @ y, prior_var=20.0, noise_var=0.5)
    zn, yn = z.numpy(), y.numpy()
    a = zn.T @ zn / 0.5 + np.eye(4) / 20.0
    np.testing.assert_allclose((chol @ chol.T).numpy(), a, rtol=1e-12)
    # the posterior mean is the ridge solution with penalty noise_var / prior_var
    ridge = np.linalg.solve(zn.T @ zn + (0.5 / 20.0) * np.eye(4), zn.T @ yn)
    np.testing.assert_allclose(mu.numpy(), ridge, rtol=1e-10)


def test_thompson_sample_mean_and_covariance():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    chol = torch.linalg.cholesky(a)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([thompson_sample(mu, chol, 20.0, g) for _ in range(4000)])
    cov = 20.0 * torch.linalg.inv(a)  # the official covariance sigma * A^-1
    assert torch.allclose(draws.mean(0), mu, atol=4 * math.sqrt(cov.diagonal().max() / 4000))
    assert torch.allclose(torch.cov(draws.T), cov, rtol=0.1, atol=0.3)
    # same seed, same draws; no chol = covariance cov_scale * I
    a1 = thompson_sample(mu, chol, 20.0, torch.Generator().manual_seed(5))
    a2 = thompson_sample(mu, chol, 20.0, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    eps = torch.randn(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(thompson_sample(mu, None, 4.0, torch.Generator().manual_seed(5)), mu + 2.0 * eps)


def test_boundary_select_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-0.5, 0.0]])
    w = torch.tensor([2.0, -1.0])
    # |z w| = 2, 1, 1, 5, 1: the three 1s, lower index first
    assert boundary_select(z, w, 3).tolist() == [1, 2, 4]
    assert boundary_select(z, w, 4).tolist() == [1, 2, 4, 0]


def test_stats_window_keeps_the_last_periods():
    w = StatsWindow(2)
    assert w.totals() is None
    rows = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 3.0]])]
    w.add(rows[0], torch.tensor([1.0]))
    w.close()
    w.add(rows[1], torch.tensor([-1.0]))
    zz, zy, n = w.totals()
    z = torch.cat(rows[:2]).double()
    assert n == 2 and torch.equal(zz, z.T @ z) and torch.equal(zy, z.T @ torch.tensor([1.0, -1.0]).double())
    w.close()  # the period of rows[0] leaves the window of 2
    w.add(rows[2], torch.tensor([2.0]))
    zz, zy, n = w.totals()
    z = torch.cat(rows[1:]).double()
    assert n == 2 and torch.equal(zz, z.T @ z) and torch.equal(zy, z.T @ torch.tensor([-1.0, 2.0]).double())
    with pytest.raises(ValueError, match="periods"):
        StatsWindow(1).load_state_dict(w.state_dict())


def _poem_problem():
    """2-d features = inputs; head: 3 classes. Candidates on known lines so |w^T z| is easy by hand."""
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    model = FeatNet(head).double().train()
    x_id = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y_id = torch.tensor([0, 1])
    x_cand = torch.tensor(
        [[3.0, 0.1], [0.2, 0.2], [-1.0, 1.1], [0.0, 4.0], [1.0, -1.0], [5.0, 5.0]], dtype=torch.float64
    )
    return model, {"x_id": x_id, "y_id": y_id, "x_aux": x_cand}


def test_poem_mines_the_boundary_and_loss_is_energy_on_the_mined():
    model, b = _poem_problem()
    m = methods.create("poem", n_selected=2, m_in=-1.0, m_out=2.0, update_every=100)
    m.compute_loss(model, b)  # first call: initial posterior, records the rows in the window
    first = m.last_selected.clone()
    m.w = torch.tensor([1.0, 1.0], dtype=torch.float64)  # inject a known sampled weight
    out = m.compute_loss(model, b)
    # |z1 + z2| = 3.1, 0.4, 0.1, 4.0, 0.0, 10.0: keep 4 and 2
    assert m.last_selected.tolist() == [4, 2]
    assert model.training and model.drop.training
    # independent value: one forward of [x_id; x_cand[4, 2]] (dropout makes train-mode logits random,
    # so compare with the same formula evaluated on the method's own selection in eval mode)
    model.eval()
    logits = model(torch.cat([b["x_id"], b["x_aux"][[4, 2]]]))
    s = -torch.logsumexp(logits, 1)
    ref_l_s = torch.relu(s[:2] + 1.0).pow(2).mean() + torch.relu(2.0 - s[2:]).pow(2).mean()
    m2 = methods.create("poem", n_selected=2, m_in=-1.0, m_out=2.0, update_every=100)
    m2.w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out_eval = m2.compute_loss(model, b)
    ce = F.cross_entropy(logits[:2], b["y_id"])
    assert out_eval["energy"].item() == pytest.approx(ref_l_s.item(), abs=1e-12)
    assert out_eval["total"].item() == pytest.approx((ce + 0.1 * ref_l_s).item(), abs=1e-12)
    assert out["n_aux_selected"].item() == 2
    # the window holds both steps' ID rows (target -3) and mined rows (+3); features = inputs in eval mode
    zz, zy, n = m.window.totals()
    z = torch.cat([b["x_id"], b["x_aux"][first], b["x_id"], b["x_aux"][[4, 2]]])
    y = torch.tensor([-3.0, -3.0, 3.0, 3.0, -3.0, -3.0, 3.0, 3.0], dtype=torch.float64)
    assert n == 8 and torch.allclose(zz, z.T @ z) and torch.allclose(zy, z.T @ y)


def _ridge(z_id, z_ood, conf=3.0, prior_var=20.0, noise_var=0.5):
    z = np.concatenate([z_id, z_ood])
    y = np.r_[np.full(len(z_id), -conf), np.full(len(z_ood), conf)]
    return np.linalg.solve(z.T @ z + (noise_var / prior_var) * np.eye(z.shape[1]), z.T @ y)


def test_poem_posterior_update_fits_the_window():
    model, b = _poem_problem()
    m = methods.create("poem", n_selected=2, update_every=2, buffer_updates=1)
    picks = []
    for _ in range(2):
        m.compute_loss(model, b)
        picks.append(m.last_selected.clone())
    assert m.n_updates == 0
    w_before = m.w.clone()
    m.compute_loss(model, b)  # step 2: refit on the 2 x 2 ID + 2 x 2 mined rows so far, then mine
    picks.append(m.last_selected.clone())
    assert m.n_updates == 1 and not torch.equal(m.w, w_before)
    x_id, x_c = b["x_id"].numpy(), b["x_aux"].numpy()
    ref = _ridge(np.concatenate([x_id, x_id]), np.concatenate([x_c[picks[0]], x_c[picks[1]]]))
    np.testing.assert_allclose(m.mu.numpy(), ref, rtol=1e-10)
    m.compute_loss(model, b)
    picks.append(m.last_selected.clone())
    m.compute_loss(model, b)  # step 4: window of 1 period = steps 2 and 3 only
    ref = _ridge(np.concatenate([x_id, x_id]), np.concatenate([x_c[picks[2]], x_c[picks[3]]]))
    np.testing.assert_allclose(m.mu.numpy(), ref, rtol=1e-10)


def test_poem_update_every_epoch_uses_the_hook():
    model, b = _poem_problem()
    m = methods.create("poem", n_selected=2)  # update_every = "epoch"
    m.on_epoch_start(model, 0)
    m.compute_loss(model, b)
    m.on_epoch_start(model, 0)
    assert m.n_updates == 0
    m.on_epoch_start(model, 1)
    assert m.n_updates == 1


def test_poem_thompson_determinism_and_state_round_trip():
    model, b = _poem_problem()
    a = methods.create("poem", n_selected=2, update_every=1, seed=7)
    c = methods.create("poem", n_selected=2, update_every=1, seed=7)
    other = methods.create("poem", n_selected=2, update_every=1, seed=8)
    for _ in range(3):
        a.compute_loss(model, b)
        c.compute_loss(model, b)
        other.compute_loss(model, b)
    assert torch.equal(a.w, c.w) and not torch.equal(a.w, other.w)
    # resume: a fresh method loading a's state continues exactly as a
    state = _roundtrip(a.state_dict())
    r = methods.create("poem", n_selected=2, update_every=1, seed=123)
    r.load_state_dict(state)
    for _ in range(2):
        a.compute_loss(model, b)
        r.compute_loss(model, b)
        assert torch.equal(a.w, r.w) and torch.equal(a.last_selected, r.last_selected)
    assert torch.equal(a.window.zz, r.window.zz) and a.steps == r.steps == 5
    with pytest.raises(ValueError, match="state keys"):
        r.load_state_dict({"generator": state["generator"]})
    with pytest.raises(ValueError, match="buffer_updates"):
        methods.create("poem", buffer_updates=1).load_state_dict(state)


def test_poem_plus_grad_adds_lambda_times_the_energy_gradient_penalty():
    from greg.methods import grad_reg

    model, b = _poem_problem()
    model.eval()  # deterministic forward for the comparison
    kw = {"n_selected": 2, "m_in": -1.0, "m_out": 2.0}
    base = methods.create("poem", **kw)
    plus = methods.create("poem", lambda_grad=0.5, **kw)
    out0, out1 = base.compute_loss(model, b), plus.compute_loss(model, b)
    assert torch.equal(base.last_selected, plus.last_selected)
    x = torch.cat([b["x_id"], b["x_aux"][plus.last_selected]]).requires_grad_(True)
    s = -torch.logsumexp(model(x), 1)
    ref = grad_reg.gradient_penalty(x, s, 2, -1.0, 2.0).loss
    assert ref.item() > 0
    assert out1["grad"].item() == pytest.approx(ref.item(), abs=1e-12)
    assert (out1["total"] - out0["total"]).item() == pytest.approx(0.5 * ref.item(), abs=1e-12)


def test_poem_needs_enough_candidates():
    model, b = _poem_problem()
    with pytest.raises(ValueError, match="n_selected=7"):
        methods.create("poem", n_selected=7).compute_loss(model, b)


# --------------------------------------------------------------------------------------------- OpenMix


def test_openmix_soft_targets_by_hand():
    t = openmix_soft_targets(torch.tensor([0, 2]), 0.7, 4)
    expected = torch.tensor([[0.7, 0.0, 0.0, 0.3], [0.0, 0.0, 0.7, 0.3]])
    assert torch.allclose(t, expected, atol=1e-7)


def test_soft_cross_entropy_is_the_official_two_term_form():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    lam = 0.62
    official = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, torch.full((5,), 3))
    ours = soft_cross_entropy(logits, openmix_soft_targets(y, lam, 4))
    assert ours.item() == pytest.approx(official.item(), abs=1e-6)


def test_sample_beta_is_the_inverse_cdf():
    # Beta(1, 1) is uniform: the draw is the uniform itself
    u = torch.rand((), generator=torch.Generator().manual_seed(4), dtype=torch.float64).item()
    assert sample_beta(1.0, torch.Generator().manual_seed(4)) == pytest.approx(u, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    lams = np.array([sample_beta(10.0, g) for _ in range(3000)])
    assert lams.min() > 0 and lams.max() < 1
    assert lams.mean() == pytest.approx(0.5, abs=0.01)
    assert lams.var() == pytest.approx(1 / 84, rel=0.1)  # alpha^2 / ((2 alpha)^2 (2 alpha + 1))


def test_openmix_loss_by_hand():
    # IdentityNet: the inputs are the logits; K = 2 ID classes + the reject class
    x_id = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    y_id = torch.tensor([0, 1, 1])
    x_aux = torch.tensor(
        [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )  # fewer: first 2 ID rows mix
    m = methods.create("openmix", seed=3)
    out = m.compute_loss(IdentityNet(), {"x_id": x_id, "y_id": y_id, "x_aux": x_aux})
    lam = m.last_lam
    assert lam == sample_beta(10.0, torch.Generator().manual_seed(3))

    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    ce = -np.mean([log_softmax(x_id[i].tolist(), int(y_id[i])) for i in range(3)])
    mix = [(lam * x_id[i] + (1 - lam) * x_aux[i]).tolist() for i in range(2)]
    soft = -np.mean(
        [lam * log_softmax(mix[i], int(y_id[i])) + (1 - lam) * log_softmax(mix[i], 2) for i in range(2)]
    )
    assert out["ce"].item() == pytest.approx(ce, abs=1e-12)
    assert out["openmix"].item() == pytest.approx(soft, abs=1e-12)
    assert out["total"].item() == pytest.approx(ce + 1.0 * soft, abs=1e-12)
    half = methods.create("openmix", seed=3, lambda_o=0.5).compute_loss(
        IdentityNet(), {"x_id": x_id, "y_id": y_id, "x_aux": x_aux}
    )
    assert half["total"].item() == pytest.approx(ce + 0.5 * soft, abs=1e-12)


def test_openmix_state_round_trip():
    a = methods.create("openmix", seed=1)
    sample_beta(10.0, a.generator)
    r = methods.create("openmix", seed=99)
    r.load_state_dict(_roundtrip(a.state_dict()))
    assert sample_beta(10.0, a.generator) == sample_beta(10.0, r.generator)


# ------------------------------------------------------------------------------------------------- DOS


def _dos_problem():
    """Two directions (the clusters of the L2-normalized features); the absent logit grows with x1 + x2.

    Candidate: 0 (3, 0.1)  1 (1, 0.05)  2 (2, 0.1)  3 (0.1, 2)  4 (0.1, 0.5)  5 (0.05, 1)
    absent probability p = e^s / (2 + e^s), s = x1 + x2 (other logits 0): increasing in s.
    cluster "x1": s = 3.1, 1.05, 2.1 -> lowest 1; cluster "x2": s = 2.1, 0.6, 1.05 -> lowest 4.
    """
    head = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    x = torch.tensor([[3.0, 0.1], [1.0, 0.05], [2.0, 0.1], [0.1, 2.0], [0.1, 0.5], [0.05, 1.0]])
    return FeatNet(head).train(), x


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_dos_picks_the_lowest_absent_probability_per_cluster(backend):
    model, x = _dos_problem()
    m = methods.create("dos", n_clusters=2, n_selected=2, kmeans_backend=backend, seed=0)
    idx = m.select(model, x)
    assert sorted(idx.tolist()) == [1, 4]
    assert model.training and model.drop.training
    # 4 outliers from 2 clusters: the released rule takes the 4 // 2 = 2 lowest of each (1, 2 and 4, 5)
    m4 = methods.create("dos", n_clusters=2, n_selected=4, kmeans_backend=backend, seed=0)
    assert sorted(m4.select(model, x).tolist()) == [1, 2, 4, 5]
    # per_cluster 1: the two picks first, then distinct random others
    m4 = methods.create("dos", n_clusters=2, n_selected=4, per_cluster=1, kmeans_backend=backend, seed=0)
    idx4 = m4.select(model, x)
    assert sorted(idx4[:2].tolist()) == [1, 4] and idx4.unique().numel() == 4
    assert m.sampler.two_way is False and m.sampler.kmeans_kwargs["n_init"] == 3


def test_absent_class_loss_by_hand():
    logits_id = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    logits_ood = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)
    total, ce, ce_ood = absent_class_loss(logits_id, y, logits_ood, beta=0.5)
    ce_ref = 0.5 * ((math.log(math.e + 2) - 1) + math.log(3))
    ood_ref = math.log(2 + math.e**2) - 2
    assert ce.item() == pytest.approx(ce_ref, abs=1e-12)
    assert ce_ood.item() == pytest.approx(ood_ref, abs=1e-12)
    assert total.item() == pytest.approx(ce_ref + 0.5 * ood_ref, abs=1e-12)


def test_dos_compute_loss_on_the_selection():
    model, x = _dos_problem()
    model.eval()
    x_id = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y_id = torch.tensor([0, 1])
    m = methods.create("dos", n_clusters=2, n_selected=2, beta=1.0)
    out = m.compute_loss(model, {"x_id": x_id, "y_id": y_id, "x_aux": x})
    sel = m.last_selected
    assert sorted(sel.tolist()) == [1, 4]
    logits = model(torch.cat([x_id, x[sel]]))
    ref = F.cross_entropy(logits[:2], y_id) + F.cross_entropy(logits[2:], torch.full((2,), 2))
    assert out["total"].item() == pytest.approx(ref.item(), abs=1e-6)


def test_dos_generator_state_and_random_mode():
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    model = FeatNet(torch.randn(4, 5))
    a = methods.create("dos", n_clusters=4, n_selected=10, seed=2)
    b = methods.create("dos", n_clusters=4, n_selected=10, seed=2)
    assert torch.equal(a.select(model, x), b.select(model, x))
    r = methods.create("dos", n_clusters=4, n_selected=10, seed=50)
    r.load_state_dict(_roundtrip(a.state_dict()))
    assert torch.equal(a.select(model, x), r.select(model, x))
    # n_clusters = None: a random choice from the generator, no forward
    rnd = methods.create("dos", n_clusters=None, n_selected=10, seed=2)
    idx = rnd.select(model, x)
    assert torch.equal(idx, torch.randperm(40, generator=torch.Generator().manual_seed(2))[:10])


# ---------------------------------------------------------------------- GReg+ sampling ablations (Table 7)


@pytest.mark.parametrize("k", [16, 32, 64, None])
def test_greg_plus_cluster_count_ablation(k):
    torch.manual_seed(0)
    model = FeatNet(torch.randn(10, 8))
    x = torch.randn(384, 8)
    m = methods.create("greg_plus", n_clusters=k, n_selected=128, seed=1)
    assert m.sampler.k == k and m.sampler.n_total == 128
    idx = m.select(model, x)
    assert idx.numel() == 128 and idx.unique().numel() == 128
    if k is None:  # no clustering: a uniform random choice drawn from the method's generator
        assert torch.equal(idx, torch.randperm(384, generator=torch.Generator().manual_seed(1))[:128])
    else:  # every pick is a cluster extreme: the global lowest and highest energy are always kept
        with torch.no_grad():
            s = -torch.logsumexp(model.eval()(x), 1)  # the sampler scores in eval mode (no dropout)
        assert int(s.argmin()) in idx.tolist() and int(s.argmax()) in idx.tolist()
    with pytest.raises(ValueError):  # 2 picks per cluster cannot exceed n_selected
        _ = methods.create("greg_plus", n_clusters=65, n_selected=128).sampler


# ------------------------------------------------------------------------------ tiny end-to-end runs


def _run_cfg(tmp_path, name, hparams, **train_over):
    cfg = config.deep_merge(
        config.DEFAULTS,
        {
            "seed": 3,
            "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
            "data": {
                "root": str(tmp_path / "data"),
                "id": "tiny",
                "aux": "tiny_aux",
                "batch_size": 16,
                "aux_batch_size": 32,
            },
            "method": {"name": name, "hparams": hparams},
            "optim": {"lr": 0.05},
            "train": {
                "epochs": 1,
                "max_steps": 3,
                "checkpoint_every": 2,
                "grad_norm_every": 0,
                "progress": False,
                **train_over,
            },
        },
    )
    config.validate(cfg)
    return cfg


RUNS = {
    "poem": {"n_selected": 8, "update_every": 1, "buffer_updates": 2},
    "poem_grad": {"n_selected": 8, "update_every": 1, "buffer_updates": 2, "lambda_grad": 1.0},
    "dos": {"n_clusters": 4, "n_selected": 8},
    "openmix": {},
    "greg_plus_random": {"n_clusters": None, "n_selected": 16},
}


@pytest.mark.parametrize("run", list(RUNS))
def test_tiny_run_then_greg_evaluate(tmp_path, run):
    from greg.cli import main

    name = {"poem_grad": "poem", "greg_plus_random": "greg_plus"}.get(run, run)
    out = tmp_path / "run"
    assert trainer.Trainer(_run_cfg(tmp_path, name, RUNS[run]), out, "cpu").run() == 0
    ck = safe_torch_load(out / "final.pt")
    method = methods.create(name)
    assert ck["num_classes"] == 10 + method.extra_classes
    assert ck["meta"]["detector"] == method.detector
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(math.isfinite(r["total"]) for r in recs)
    if run == "poem_grad":
        assert all("grad" in r for r in recs)
    ev = tmp_path / "eval"
    argv = [
        "evaluate",
        "--checkpoint",
        str(out / "final.pt"),
        "--id",
        "tiny",
        "--ood",
        "tiny_uniform",
        "--detector",
        method.detector,
        "--root",
        str(tmp_path / "data"),
        "--device",
        "cpu",
        "--n-ood",
        "64",
        "--out",
        str(ev),
    ]
    assert main(argv) == 0
    df = pd.read_csv(ev / "metrics.csv")
    assert list(df["ood_set"]) == ["tiny_uniform", "mean"]
    assert ((df["auroc"] >= 0) & (df["auroc"] <= 100)).all()
    with np.load(ev / "scores" / "id.npz") as z:
        if method.detector == "absent_class":  # a probability
            assert (z["scores"] >= 0).all() and (z["scores"] <= 1).all()
        assert z["pred"].max() < 10  # (K+1)-class models never predict the extra class


def test_poem_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    hp = {"n_selected": 8, "update_every": 2, "buffer_updates": 1}
    ref = tmp_path / "ref"
    assert trainer.Trainer(_run_cfg(tmp_path, "poem", hp, max_steps=5), ref, "cpu").run() == 0
    out = tmp_path / "cut"
    t = trainer.Trainer(_run_cfg(tmp_path, "poem", hp, max_steps=5), out, "cpu")
    orig = t.method.compute_loss

    def compute_loss(model, batch):
        if t.step == 2:  # stop after step 3 (not a checkpoint step): state.pt written at step 3
            t._stop_signal = signal.SIGTERM
        return orig(model, batch)

    monkeypatch.setattr(t.method, "compute_loss", compute_loss)
    assert t.run() == EXIT_PREEMPTED
    assert trainer.Trainer(_run_cfg(tmp_path, "poem", hp, max_steps=5), out, "cpu").run() == 0
    a, b = safe_torch_load(ref / "final.pt")["state_dict"], safe_torch_load(out / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = safe_torch_load(ref / "state.pt")["method"], safe_torch_load(out / "state.pt")["method"]
    assert torch.equal(sa["w"], sb["w"]) and torch.equal(sa["window"]["zz"], sb["window"]["zz"])
    assert sa["n_updates"] == 2
