"""greg.robustness: Eq. 4 radius on a linear score (closed form), PGD direction and budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from greg import robustness as rb
from greg.detectors import create
from greg.metrics import id_threshold, ood_metrics

W = torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[0.0, 3.0], [-1.0, 1.0]]])  # 2 x 2 x 2 "image"


def linear_score(x: torch.Tensor) -> torch.Tensor:
    """S(x) = <w, x> + 1: gradient w everywhere, ||w||_2 = sqrt(16.25), ||w||_1 = 8.5."""
    return (x * W.to(x)).flatten(1).sum(1) + 1.0


def test_certified_radius_linear_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, 2, 2, generator=g, dtype=torch.float64)
    s = linear_score(x)
    gamma = float(s.median())
    l2, l1 = float(W.norm()), float(W.abs().sum())
    for norm, dual in (("l2", l2), ("linf", l1)):
        r = rb.certified_radius(linear_score, x, gamma, eps=0.3, norm=norm)
        expected = torch.where(s <= gamma, ((gamma - s) / dual).clamp(max=0.3), torch.zeros_like(s))
        assert torch.allclose(r, expected)
    # The radius is tight for a linear score: moving by r along the gradient reaches gamma exactly.
    r = rb.certified_radius(linear_score, x, gamma, eps=1e9, norm="l2")
    moved = linear_score(x + r.view(-1, 1, 1, 1) * W.double() / l2)
    inside = s <= gamma
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], gamma))


def test_certified_radius_zero_gradient_gives_eps():
    def const(x):
        return x.flatten(1).sum(1) * 0.0

    r = rb.certified_radius(const, torch.zeros(3, 1, 2, 2), gamma=0.0, eps=0.7)
    assert torch.equal(r, torch.full((3,), 0.7))
    assert torch.equal(
        rb.certified_radius(const, torch.zeros(2, 1, 2, 2), gamma=-1.0, eps=0.7), torch.zeros(2)
    )


def test_certify_and_summary():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 2, 2, generator=g)
    dl = DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long)), batch_size=16)
    radii, summary = rb.certify(linear_score, dl, "cpu", eps=0.5)
    s = linear_score(x).double().numpy()
    gamma = id_threshold(s)
    expected = np.where(s <= gamma, np.minimum(0.5, (gamma - s) / float(W.norm())), 0.0)
    np.testing.assert_allclose(radii, expected, rtol=1e-5, atol=1e-6)
    assert summary["gamma"] == pytest.approx(gamma)
    assert summary["median_radius"] == pytest.approx(float(np.median(expected)), abs=1e-6)
    assert summary["certified_frac"] == pytest.approx(float(np.mean(expected >= 0.5)))
    assert summary["n"] == 40 and np.mean(s > gamma) <= 0.05


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_linear_reaches_the_optimum(norm):
    x = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    eps = 0.1
    s0 = linear_score(x)
    drop = eps * (float(W.abs().sum()) if norm == "linf" else float(W.norm()))
    down = rb.pgd_attack(linear_score, x, direction=-1, eps=eps, alpha=0.03, steps=10, norm=norm)
    up = rb.pgd_attack(linear_score, x, direction=1, eps=eps, alpha=0.03, steps=10, norm=norm)
    assert torch.allclose(linear_score(down), s0 - drop, atol=1e-5)
    assert torch.allclose(linear_score(up), s0 + drop, atol=1e-5)
    d = (down - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def feature_map(self, x):
        return torch.relu(self.conv(x))

    def pool(self, f):
        return f.mean((2, 3))

    def features(self, x):
        return self.pool(self.feature_map(x))

    def forward(self, x):
        return self.head(self.features(x))


def test_pgd_moves_energy_in_the_requested_direction_and_metrics_degrade():
    model = Net().eval()
    fn = rb.detector_score_fn(create("energy"), model)
    g = torch.Generator().manual_seed(3)
    x_id = torch.randn(24, 3, 6, 6, generator=g) + 1.0
    x_ood = torch.randn(24, 3, 6, 6, generator=g)
    kw = {"eps": 0.05, "alpha": 0.02, "steps": 5, "norm": "linf"}
    with torch.no_grad():
        clean_id, clean_ood = fn(x_id), fn(x_ood)
    adv_ood = fn(rb.pgd_attack(fn, x_ood, direction=-1, **kw)).detach()
    adv_id = fn(rb.pgd_attack(fn, x_id, direction=1, **kw)).detach()
    assert (adv_ood < clean_ood).all() and (adv_id > clean_id).all()

    def dl(x):
        return DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=10)

    scores, df = rb.attack_metrics(fn, dl(x_id), {"noise": dl(x_ood)}, "cpu", **kw)
    np.testing.assert_allclose(scores["id"], adv_id.double().numpy(), rtol=1e-5)
    clean = ood_metrics(clean_id, clean_ood)
    row = df.set_index("ood_set").loc["noise"]
    assert row["auroc"] <= clean["auroc"]
    assert list(df["ood_set"]) == ["noise", "mean"] and (df["eps"] == 0.05).all()


def test_random_start_is_seeded_and_within_budget():
    x = torch.zeros(4, 2, 2, 2)
    a = rb.pgd_attack(
        linear_score,
        x,
        direction=-1,
        eps=0.1,
        alpha=0.0,
        steps=0,
        norm="l2",
        random_start=True,
        generator=torch.Generator().manual_seed(0),
    )
    b = rb.pgd_attack(
        linear_score,
        x,
        direction=-1,
        eps=0.1,
        alpha=0.0,
        steps=0,
        norm="l2",
        random_start=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(a, b) and (a.flatten(1).norm(dim=1) <= 0.1 + 1e-6).all() and a.abs().sum() > 0


def test_rejects_gradient_sign_detectors_and_bad_args():
    with pytest.raises(ValueError, match="not differentiable"):
        rb.detector_score_fn(create("odin"), Net())
    with pytest.raises(ValueError, match="norm"):
        rb.pgd_attack(
            linear_score, torch.zeros(1, 2, 2, 2), direction=1, eps=0.1, alpha=0.1, steps=1, norm="l3"
        )
    with pytest.raises(ValueError, match="direction"):
        rb.pgd_attack(linear_score, torch.zeros(1, 2, 2, 2), direction=0, eps=0.1, alpha=0.1, steps=1)
