"""SAM fine-tuning: the SAM optimizer (plain and only-norm), BN running stats, pseudo-OOD transforms, the
methods in the trainer (exact resume), and the appendix diagnostics."""

from __future__ import annotations

import copy
import json
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from greg import config, diagnostics, io, methods, pseudo_ood
from greg.errors import EXIT_PREEMPTED
from greg.optim.sam import SAM, frozen_norm_stats, norm_parameters
from greg.trainer import Trainer


class Net(nn.Module):
    """conv -> BN -> ReLU -> conv -> GroupNorm -> pool -> LayerNorm -> linear head (three norm types)."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, k)

    def features(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.ln(self.gn(self.conv2(x)).mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net().double().train()
    with torch.no_grad():  # non-trivial affine params so perturbations are visible everywhere
        for m in (net.bn, net.gn, net.ln):
            m.weight.add_(0.1 * torch.randn_like(m.weight))
            m.bias.add_(0.1 * torch.randn_like(m.bias))
    return net


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def loss_of(net, x, y):
    return F.cross_entropy(net(x), y)


NORM_NAMES = {"bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias"}


class SpySGD(torch.optim.SGD):
    """Records the weights and gradients at the moment the base step runs."""

    def step(self, closure=None):
        self.seen = [
            (p.detach().clone(), p.grad.detach().clone()) for g in self.param_groups for p in g["params"]
        ]
        return super().step(closure)


# --- SAM optimizer ---------------------------------------------------------------------------------------


def test_norm_parameters_by_module_type():
    net = make_net()
    names = {n for n, p in net.named_parameters() if any(p is q for q in norm_parameters(net))}
    assert names == NORM_NAMES


def test_only_norm_first_step_matches_hand_computation_and_restores_exactly():
    net = make_net()
    x, y = batch()
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SpySGD(net.parameters(), lr=0.1)
    rho = 0.3
    sam = SAM.only_norm(net, opt, rho)
    loss_of(net, x, y).backward()
    g = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    gn = math.sqrt(sum(float((g[n] ** 2).sum()) for n in NORM_NAMES))  # norm over norm-layer grads only
    returned = sam.first_step(zero_grad=True)
    assert float(returned) == pytest.approx(gn, rel=1e-12)
    for n, p in net.named_parameters():
        if n in NORM_NAMES:
            assert torch.allclose(p, w0[n] + rho * g[n] / gn, rtol=0, atol=1e-12), n  # eps=1e-12 in the norm
            assert not torch.equal(p, w0[n]), n
        else:
            assert torch.equal(p, w0[n]), n
    assert all(p.grad is None for p in net.parameters())
    # gradient at the perturbed point, computed by hand on an independent copy
    ref = copy.deepcopy(net)
    loss_of(ref, x, y).backward()
    g_pert = [p.grad.detach().clone() for p in ref.parameters()]

    loss_of(net, x, y).backward()
    sam.second_step(zero_grad=True)
    for (w_seen, g_seen), (n, _), gp in zip(opt.seen, net.named_parameters(), g_pert):
        assert torch.equal(w_seen, w0[n]), f"{n} not restored exactly before the base step"
        assert torch.equal(g_seen, gp), n
    # all parameters (norm and not) stepped with the perturbed-point gradient
    for (n, p), gp in zip(net.named_parameters(), g_pert):
        assert torch.allclose(p, w0[n] - 0.1 * gp, rtol=0, atol=1e-14), n
    assert sam._old is None  # stateless across steps


def test_plain_sam_update_equals_manual_two_pass():
    net = make_net(1)
    ref = copy.deepcopy(net)
    x, y = batch(1)
    lr, rho, wd, mom = 0.05, 0.05, 5e-4, 0.9
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mom, nesterov=True, weight_decay=wd)
    sam = SAM(opt, rho)
    loss_of(net, x, y).backward()
    sam.first_step(zero_grad=True)
    with frozen_norm_stats(net):
        loss_of(net, x, y).backward()
    sam.second_step(zero_grad=True)

    # manual: e = rho g / ||g|| over all params; g' at w + e; nesterov SGD first step: buf = g'+wd w,
    # update = (g'+wd w) + mom * buf
    params = list(ref.parameters())
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss_of(ref, x, y), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    gp = torch.autograd.grad(loss_of(ref, x, y), params)
    for p, wi, gpi in zip(net.parameters(), w, gp):
        d = gpi + wd * wi
        assert torch.allclose(p, wi - lr * (d + mom * d), rtol=0, atol=1e-13)
    assert sam.state_dict() == opt.state_dict()


def test_sam_step_with_closure_equals_first_second_step():
    a, b = make_net(2), make_net(2)
    x, y = batch(2)
    sa = SAM(torch.optim.SGD(a.parameters(), lr=0.1), 0.1)
    sb = SAM(torch.optim.SGD(b.parameters(), lr=0.1), 0.1)
    loss_of(a, x, y).backward()
    sa.first_step(zero_grad=True)
    loss_of(a, x, y).backward()
    sa.second_step(zero_grad=True)
    loss_of(b, x, y).backward()

    def closure():
        loss = loss_of(b, x, y)
        loss.backward()
        return loss

    sb.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bn_running_stats_after_sam_step_equal_one_plain_forward():
    net = make_net(3)
    net.bn.momentum = None  # cumulative average: the case davda54's momentum=0 trick gets wrong
    plain = copy.deepcopy(net)
    x, y = batch(3)
    with torch.no_grad():
        plain(x)
    sam = SAM.only_norm(net, torch.optim.SGD(net.parameters(), lr=0.1), 0.5)
    loss_of(net, x, y).backward()
    sam.first_step(zero_grad=True)
    with frozen_norm_stats(net):
        loss_of(net, x, y).backward()
    sam.second_step(zero_grad=True)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net.bn, k), getattr(plain.bn, k)), k
    assert int(net.bn.num_batches_tracked) == 1


def test_method_train_step_bn_stats_and_manual_update():
    m = methods.create("sam_only_norm", rho=0.2, seed=7)
    net = make_net(4)
    ref = copy.deepcopy(net)
    x, y = batch(4, n=4)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    terms = m.train_step(net, {"x_id": x, "y_id": y}, opt)
    assert set(terms) >= {"total", "ce", "energy", "sam_total", "sam_grad_norm"}
    assert all(not t.requires_grad for t in terms.values())

    # manual: same pseudo-OOD draw (same seed), loss on [x; T(x)], only-norm perturbation, plain SGD step
    x_ood = pseudo_ood.patch_shuffle(x, torch.Generator().manual_seed(7), grid=4)
    m2 = methods.create("sam_only_norm", rho=0.2)
    plain_stats = copy.deepcopy(ref)
    with torch.no_grad():
        plain_stats(torch.cat([x, x_ood]))
    params = list(ref.parameters())
    is_norm = [any(p is q for q in norm_parameters(ref)) for p in params]
    w = [p.detach().clone() for p in params]
    loss = m2.loss_terms(ref, x, y, x_ood)["total"]
    assert float(loss.detach()) == pytest.approx(float(terms["total"]), rel=1e-12)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((gi**2).sum() for gi, n in zip(g, is_norm) if n))
    with torch.no_grad():
        for p, gi, n in zip(params, g, is_norm):
            if n:
                p.add_(0.2 * gi / norm)
    gp = torch.autograd.grad(m2.loss_terms(ref, x, y, x_ood)["total"], params)
    for p, wi, gpi in zip(net.parameters(), w, gp):
        assert torch.allclose(p, wi - 0.1 * gpi, rtol=0, atol=1e-13)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net.bn, k), getattr(plain_stats.bn, k)), k


def test_method_registry_and_validation():
    assert {"sam", "sam_only_norm"} <= set(methods.names())
    plain, on = methods.create("sam"), methods.create("sam_only_norm")
    assert plain.hparams["rho"] == 0.05 and on.hparams["rho"] == 0.5
    assert not plain.needs_aux and plain.detector == "energy" and on.only_norm and not plain.only_norm
    with pytest.raises(ValueError, match="ood_loss"):
        methods.create("sam", ood_loss="kl")
    with pytest.raises(ValueError, match="grid"):
        methods.create("sam", pseudo_ood_kwargs={"grd": 4})
    with pytest.raises(ValueError, match="pseudo_ood"):
        methods.create("sam", pseudo_ood="nope")


def test_oe_ood_loss_value():
    m = methods.create("sam", ood_loss="oe", lambda_ood=0.5)
    net = make_net(5)
    x, y = batch(5, n=4)
    x_ood = -x
    with torch.no_grad():
        logits = net(torch.cat([x, x_ood]))
    ce = F.cross_entropy(logits[:4], y)
    logp = torch.log_softmax(logits[4:], dim=1)
    oe = -logp.mean()  # CE to the uniform distribution, batch mean
    t = m.loss_terms(net, x, y, x_ood)
    assert float(t["oe"]) == pytest.approx(float(oe), rel=1e-12)
    assert float(t["total"].detach()) == pytest.approx(float(ce + 0.5 * oe), rel=1e-12)


# --- pseudo-OOD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["patch_shuffle", "blur_noise", "pixel_permute"])
def test_pseudo_ood_deterministic_under_seed(name):
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    f = pseudo_ood.make(name)
    a = f(x, torch.Generator().manual_seed(3))
    b = f(x, torch.Generator().manual_seed(3))
    c = f(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_patch_shuffle_is_a_permutation_of_patches():
    grid, b, c, h = 4, 3, 2, 12
    x = torch.randn(b, c, h, h, generator=torch.Generator().manual_seed(1))
    out = pseudo_ood.patch_shuffle(x, torch.Generator().manual_seed(2), grid=grid)
    p = h // grid
    for i in range(b):
        src = [x[i, :, r * p : (r + 1) * p, s * p : (s + 1) * p] for r in range(grid) for s in range(grid)]
        dst = [out[i, :, r * p : (r + 1) * p, s * p : (s + 1) * p] for r in range(grid) for s in range(grid)]
        match = [next(j for j, sp in enumerate(src) if torch.equal(dp, sp)) for dp in dst]
        assert sorted(match) == list(range(grid * grid))  # a bijection between patches
        assert match != list(range(grid * grid))  # not the identity


def test_patch_shuffle_never_identity_on_grid2():
    x = torch.arange(200 * 4, dtype=torch.float32).reshape(200, 1, 2, 2)
    out = pseudo_ood.patch_shuffle(x, torch.Generator().manual_seed(0), grid=2)
    assert not (out == x).flatten(1).all(dim=1).any()
    with pytest.raises(ValueError, match="divide"):
        pseudo_ood.patch_shuffle(torch.zeros(1, 1, 10, 10), torch.Generator(), grid=4)


def test_pixel_permute_keeps_each_images_pixels():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    out = pseudo_ood.pixel_permute(x, torch.Generator().manual_seed(1))
    for i in range(2):
        # the same permutation for all channels: the set of (r, g, b) pixel tuples is unchanged
        a = sorted(map(tuple, x[i].reshape(3, -1).T.tolist()))
        b = sorted(map(tuple, out[i].reshape(3, -1).T.tolist()))
        assert a == b


def test_blur_matches_scipy_and_noise_is_added():
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma_frac = 1.5 / 20  # sigma 1.5 px: radius ceil(4.5) = 5 = scipy's int(truncate * sigma + 0.5)
    ours = pseudo_ood.blur_noise(x, torch.Generator(), sigma_frac=sigma_frac, noise_std=0.0)
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    noisy = pseudo_ood.blur_noise(x, torch.Generator().manual_seed(5), sigma_frac=sigma_frac, noise_std=0.5)
    expected = ours + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).double()
    assert torch.allclose(noisy, expected, atol=1e-6)


# --- trainer: runs and resumes exactly ---------------------------------------------------------------------

RUN = {
    "seed": 3,
    "model": {"name": "small_cnn", "kwargs": {"widths": [8, 8]}},
    "data": {"id": "tiny", "batch_size": 16, "augment": True},
    "method": {"name": "sam_only_norm", "hparams": {"rho": 0.5}},
    "optim": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "cosine"},
    "train": {"epochs": 1, "max_steps": 5, "checkpoint_every": 2, "grad_norm_every": 0, "progress": False},
}


def _cfg(tmp_path):
    cfg = config.deep_merge(config.DEFAULTS, RUN)
    cfg["data"]["root"] = str(tmp_path / "data")
    config.validate(cfg)
    return cfg


def test_trainer_sam_only_norm_runs_and_resumes_to_identical_weights(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert Trainer(_cfg(tmp_path), ref, "cpu").run() == 0
    ck = io.safe_torch_load(ref / "final.pt")
    assert ck["meta"]["method"] == "sam_only_norm" and ck["meta"]["detector"] == "energy"
    recs = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(5))
    assert all(r["sam_grad_norm"] > 0 and math.isfinite(r["sam_total"]) for r in recs)

    out = tmp_path / "cut"
    t = Trainer(_cfg(tmp_path), out, "cpu")
    orig = t.method.train_step

    def train_step(model, batch, optimizer):
        if t.step == 2:  # not a checkpoint step: the signal handler checkpoints at step 3
            t._stop_signal = signal.SIGTERM
        return orig(model, batch, optimizer)

    monkeypatch.setattr(t.method, "train_step", train_step)
    assert t.run() == EXIT_PREEMPTED
    assert io.safe_torch_load(out / "state.pt")["step"] == 3
    assert Trainer(_cfg(tmp_path), out, "cpu").run() == 0
    a, b = (
        io.safe_torch_load(ref / "final.pt")["state_dict"],
        io.safe_torch_load(out / "final.pt")["state_dict"],
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the appendix diagnostics straight from the run checkpoint
    d = diagnostics.collect_checkpoint(
        ref / "final.pt", "tiny", ["tiny_gaussian"], tmp_path / "data", "cpu", batch_size=8, max_samples=12
    )
    assert set(d) == {"id", "tiny_gaussian"}
    assert all(v["head_grad_norm"].shape == (12,) and np.isfinite(v["max_logit"]).all() for v in d.values())
    init = Trainer(_cfg(tmp_path), tmp_path / "fresh", "cpu").model.state_dict()
    assert not torch.equal(init["head.weight"], a["head.weight"])  # it did train


def test_presets_load():
    for name in ("sam", "sam_only_norm"):
        cfg = config.load_config([f"config/methods/{name}.yaml"])
        assert cfg["method"]["name"] == name


# --- diagnostics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_bias", [False, True])
def test_head_grad_norm_closed_form_equals_autograd(include_bias):
    torch.manual_seed(0)
    head = nn.Linear(5, 4).double()
    h = torch.randn(7, 5, dtype=torch.float64)
    closed = diagnostics.head_grad_norm_closed_form(head, h, include_bias)
    vm = diagnostics.head_grad_norm_autograd(head, h, include_bias)
    loop = []
    for hi in h:  # independent: one backward per sample
        head.zero_grad()
        logits = head(hi[None])
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        sq = head.weight.grad.pow(2).sum() + (head.bias.grad.pow(2).sum() if include_bias else 0.0)
        loop.append(float(sq.sqrt()))
    assert torch.allclose(closed, vm, rtol=1e-12, atol=0)
    np.testing.assert_allclose(closed.numpy(), loop, rtol=1e-12)


def test_collect_and_plots(tmp_path):
    net = make_net(6).float()
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 8, 8), torch.zeros(10, dtype=torch.long))
    loaders = {"id": torch.utils.data.DataLoader(ds, batch_size=4), "noise": [torch.randn(3, 3, 8, 8) * 5]}
    d = diagnostics.collect_sets(net, loaders, "cpu")
    assert net.training  # mode restored
    assert d["id"]["head_grad_norm"].shape == (10,) and d["noise"]["max_logit"].shape == (3,)
    with torch.no_grad():
        net.eval()
        logits = net(ds.tensors[0])
    np.testing.assert_allclose(d["id"]["max_logit"], logits.amax(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(d["id"]["energy"], -torch.logsumexp(logits, 1).numpy(), rtol=1e-5)
    written = diagnostics.plot_before_after(
        {k: v["energy"] for k, v in d.items()},
        {k: v["energy"] + 1 for k, v in d.items()},
        tmp_path / "fig" / "scores",
    )
    written += diagnostics.plot_diagnostics(d, tmp_path / "fig" / "diag")
    for p in written:
        head = p.read_bytes()[:8]
        assert head.startswith(b"%PDF") if p.suffix == ".pdf" else head.startswith(b"\x89PNG")
    assert sorted(x.name for x in (tmp_path / "fig").iterdir()) == [
        "diag.pdf",
        "diag.png",
        "scores.pdf",
        "scores.png",
    ]
    diagnostics.save_npz(tmp_path / "d.npz", d)
    with np.load(tmp_path / "d.npz") as z:
        np.testing.assert_array_equal(z["noise/head_grad_norm"], d["noise"]["head_grad_norm"])
