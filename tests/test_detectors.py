"""greg.detectors on a tiny model: shapes, orientation, reductions to simpler scores, independent formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import greg.detectors as D
from greg import scores


class TinyNet(nn.Module):
    """feature_map = relu(conv1x1(x)); pool = spatial mean; head = linear (the model contract)."""

    def __init__(self, c_in: int = 3, k: int = 2, identity: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_in, 1, bias=False)
        self.head = nn.Linear(c_in, k)
        if identity:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(c_in).view(c_in, c_in, 1, 1))
                self.head.weight.zero_()
                self.head.bias.zero_()
                for c in range(k):
                    self.head.weight[c, c] = 4.0

    def feature_map(self, x):
        return torch.relu(self.conv(x))

    def pool(self, fmap):
        return fmap.mean(dim=(2, 3))

    def features(self, x):
        return self.pool(self.feature_map(x))

    def forward(self, x):
        return self.head(self.features(x))


def id_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c in {0, 1}: channel c = 2, channel 2 = a large checkerboard nuisance (makes the feature map
    rank 2, so RankFeat keeps class evidence); logits of TinyNet are [8, 0] or [0, 8]: very peaked."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.05 * torch.rand(n, 3, 4, 4, generator=g)
    x[torch.arange(n), y] += 2.0
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    x[:, 2] += 4.0 + 4.0 * checker
    return x, y


def ood_like(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.rand(n, 3, 4, 4, generator=g)


def loader(x, y, bs=8):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


SETTINGS = {
    "msp": {},
    "max_logit": {},
    "energy": {},
    "odin": {},
    "react": {},
    "dice": {"p": 50},  # 2 x 3 weights: the default p=90 keeps one weight
    "line": {"p_w": 50, "p_a": 50, "clip_threshold": None},
    "mahalanobis": {},
    "rankfeat": {},
}


def test_registry_lists_every_detector():
    assert set(D.names()) == set(SETTINGS) | {"absent_class", "msp_known"}
    with pytest.raises(KeyError, match="did you mean 'react'"):
        D.create("reakt")
    with pytest.raises(TypeError, match="detector 'react'"):
        D.create("react", nonsense=1)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_shapes_and_orientation(name):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x_fit, y_fit = id_like(32, seed=10)
    det = D.create(name, **SETTINGS[name])
    det.fit(model, loader(x_fit, y_fit), "cpu")
    x_id, _ = id_like(6)
    x_ood = ood_like(6)
    ctx = torch.no_grad if det.requires_grad else torch.inference_mode
    with ctx():
        s_id, s_ood = det.score(model, x_id), det.score(model, x_ood)
    assert s_id.shape == (6,) and s_ood.shape == (6,)
    assert torch.isfinite(s_id).all() and torch.isfinite(s_ood).all()
    assert s_id.max() < s_ood.min(), (s_id, s_ood)


def test_requires_grad_flags():
    grad = {n for n in SETTINGS if D.create(n, **SETTINGS[n]).requires_grad}
    assert grad == {"odin"}
    assert D.create("mahalanobis", eps=0.01).requires_grad
    assert D.create("react").needs_fit and not D.create("energy").needs_fit


def test_fitted_detector_fails_before_fit():
    with pytest.raises(RuntimeError, match="before fit"):
        D.create("react").score(TinyNet(), ood_like(2))


def random_model(seed=0, k=3):
    torch.manual_seed(seed)
    return TinyNet(k=k, identity=False).eval()


def test_msp_and_max_logit_against_hand_values():
    """Independent of greg.scores: logits (0, ln 3) have softmax (1/4, 3/4); (2, -1) has max softmax
    1 / (1 + e^-3). Scores are negated (higher = more OOD)."""
    import math

    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    model = nn.Identity()
    model.head = None  # the logit detectors read only model(x)
    msp = D.create("msp").score(model, logits)
    assert msp.tolist() == pytest.approx([-0.75, -1.0 / (1.0 + math.exp(-3.0))], rel=1e-6)
    assert scores.msp(logits).tolist() == pytest.approx(msp.tolist(), rel=1e-6)
    assert D.create("max_logit").score(model, logits).tolist() == pytest.approx([-math.log(3.0), -2.0], rel=1e-6)
    assert scores.max_logit(logits).tolist() == pytest.approx([-math.log(3.0), -2.0], rel=1e-6)


def test_logit_detectors_use_scores_module():
    model = random_model()
    x = torch.randn(5, 3, 4, 4)
    logits = model(x)
    with torch.inference_mode():
        assert torch.equal(D.create("msp").score(model, x), scores.msp(logits))
        assert torch.equal(D.create("max_logit").score(model, x), scores.max_logit(logits))
        assert torch.equal(D.create("energy").score(model, x), scores.energy(logits))
        assert torch.allclose(D.create("absent_class").score(model, x), torch.softmax(logits, 1)[:, -1])
        # OpenMix's evaluation: softmax over all but the last logit, renormalized
        known = torch.exp(logits[:, :-1]) / torch.exp(logits[:, :-1]).sum(1, keepdim=True)
        assert torch.allclose(D.create("msp_known").score(model, x), -known.max(1).values)


def test_react_p100_equals_energy_on_fit_data():
    model = random_model()
    x, y = torch.randn(20, 3, 4, 4), torch.zeros(20, dtype=torch.long)
    det = D.create("react", percentile=100).fit(model, loader(x, y), "cpu")
    assert det.threshold == pytest.approx(float(model.features(x).detach().max()))
    with torch.inference_mode():
        assert torch.allclose(det.score(model, x), scores.energy(model(x)))


def test_react_clips_at_flattened_percentile():
    model = random_model()
    x, y = torch.randn(20, 3, 4, 4), torch.zeros(20, dtype=torch.long)
    det = D.create("react", percentile=90).fit(model, loader(x, y), "cpu")
    h = model.features(x).detach()
    assert det.threshold == pytest.approx(float(np.percentile(h.numpy().ravel(), 90)))
    with torch.inference_mode():
        expected = scores.energy(model.head(h.clamp(max=det.threshold)))
        assert torch.allclose(det.score(model, x), expected)


def test_dice_p0_equals_energy_and_p_matches_reference():
    model = random_model(k=3)
    x, y = torch.randn(20, 3, 4, 4), torch.zeros(20, dtype=torch.long)
    with torch.inference_mode():
        e = scores.energy(model(x))
        assert torch.allclose(D.create("dice", p=0).fit(model, loader(x, y), "cpu").score(model, x), e)
        det = D.create("dice", p=60).fit(model, loader(x, y), "cpu")
        got = det.score(model, x)
    h = model.features(x).detach().double().numpy()
    w = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    contrib = h.mean(0)[None, :] * w
    mask = contrib > np.percentile(contrib, 60)
    assert 0 < mask.sum() < mask.size
    logits = h @ (w * mask).T + b
    ref = -np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_odin_reduces_to_msp_and_divides_by_std():
    model = random_model()
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        msp = scores.msp(model(x))
    assert torch.allclose(D.create("odin", temperature=1, eps=0).score(model, x), msp)
    # A step of eps / std with std = 2 is the step eps / 2 without std.
    a = D.create("odin", temperature=10, eps=0.02, std=[2.0, 2.0, 2.0]).score(model, x)
    b = D.create("odin", temperature=10, eps=0.01).score(model, x)
    assert torch.allclose(a, b)
    # The perturbation raises the temperature-scaled max softmax (lowers the score), to first order.
    c = D.create("odin", temperature=10, eps=0.0).score(model, x)
    assert (b <= c + 1e-7).all() and (b < c).any()
    # Runs under no_grad (evaluate's context for gradient detectors) and leaves parameter grads alone.
    assert all(p.grad is None for p in model.parameters())


def test_mahalanobis_matches_sklearn_style_reference():
    model = random_model(k=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, 4, 4, generator=g)
    y = torch.arange(30) % 3
    det = D.create("mahalanobis").fit(model, loader(x, y), "cpu")
    xt = torch.randn(7, 3, 4, 4, generator=g)
    with torch.inference_mode():
        got = det.score(model, xt).numpy()
    h = model.features(x).detach().double().numpy()
    ht = model.features(xt).detach().double().numpy()
    yn = y.numpy()
    mu = np.stack([h[yn == c].mean(0) for c in range(3)])
    xc = h - mu[yn]
    xc = xc - xc.mean(0)  # EmpiricalCovariance(assume_centered=False); the mean is ~0 already
    prec = pinvh(xc.T @ xc / len(h))
    d = np.stack([0.5 * np.einsum("nd,de,ne->n", ht - m, prec, ht - m) for m in mu], 1)
    np.testing.assert_allclose(got, d.min(1), rtol=1e-4, atol=1e-5)
    # Input pre-processing moves towards the closest Gaussian: the score goes down.
    pert = D.create("mahalanobis", eps=0.01).fit(model, loader(x, y), "cpu")
    with torch.no_grad():
        s_eps = pert.score(model, xt).numpy()
    assert (s_eps <= got + 1e-6).all() and (s_eps < got).any()


def test_line_matches_loop_reference():
    model = random_model(k=3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, 4, 4, generator=g)
    y = torch.arange(24) % 3
    det = D.create("line", p_w=50, p_a=30, clip_threshold=0.4).fit(model, loader(x, y), "cpu")
    xt = torch.randn(9, 3, 4, 4, generator=g)
    with torch.inference_mode():
        got = det.score(model, xt).numpy()
    # Reference written after the released RouteLUNCH: per-class masks, per-sample loop.
    h = model.features(x).detach().double().numpy()
    w = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    yn = y.numpy()
    shap = np.stack([w[c] * h[yn == c].mean(0) for c in range(3)])
    ref = []
    for hi in np.minimum(model.features(xt).detach().double().numpy(), 0.4):
        c = int(np.argmax(w @ hi + b))
        mask_f = shap[c] > np.percentile(shap[c], 30)
        m = np.abs(shap[c])[None, :] * w
        mask_w = m > np.percentile(m, 50)
        logits = (w * mask_w) @ (hi * mask_f) + b
        ref.append(-np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=1e-5)


def test_line_percentile_clip_and_no_masks_is_react():
    model = random_model(k=3)
    x, y = torch.randn(24, 3, 4, 4), torch.arange(24) % 3
    line = D.create("line", p_w=0, p_a=0, clip_threshold=None, clip_percentile=80).fit(
        model, loader(x, y), "cpu"
    )
    react = D.create("react", percentile=80).fit(model, loader(x, y), "cpu")
    with torch.inference_mode():
        assert torch.allclose(line.score(model, x), react.score(model, x), atol=1e-6)


def test_remove_rank1():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 5, 1, generator=g), torch.randn(4, 1, 6, generator=g)
    fmap = (u @ v).reshape(4, 5, 2, 3)  # rank 1 per sample
    for method in ("svd", "power"):
        out = D.remove_rank1(fmap, method)
        assert out.abs().max() < 1e-4 * fmap.abs().max()
    # Rank 2 with well separated singular values: SVD and power iteration agree with numpy.
    m = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    uu, ss, vv = np.linalg.svd(m.numpy(), full_matrices=False)
    ref = m.numpy() - ss[:, :1, None] * uu[:, :, :1] @ vv[:, :1, :]
    fm = m.reshape(3, 5, 2, 3)
    np.testing.assert_allclose(D.remove_rank1(fm, "svd").reshape(3, 5, 6).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(
        D.remove_rank1(fm, "power", iterations=200).reshape(3, 5, 6).numpy(), ref, atol=1e-6
    )


def test_rankfeat_zeroes_a_rank1_feature_map():
    model = TinyNet()
    x = torch.zeros(2, 3, 4, 4)
    x[:, 0] = torch.rand(2, 4, 4) + 1.0  # only channel 0 active: the feature map is rank 1
    with torch.inference_mode():
        s = D.create("rankfeat").score(model, x)
        # features after removal are ~0, so logits are the (zero) bias: energy = -log K
        assert torch.allclose(s, torch.full((2,), -np.log(2.0), dtype=s.dtype), atol=1e-5)
        fmap = D.remove_rank1(model.feature_map(x))
        assert model.pool(fmap).abs().max() < 1e-5
