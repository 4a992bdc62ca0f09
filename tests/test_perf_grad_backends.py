"""grad_backend "exact" (hand-written batch-norm double backward) and "fd" (finite difference) against the
reference double backprop ("exact_native", PyTorch's own batch norm)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import TinyNet
from torch import nn

from greg import methods, models
from greg.methods import fused_backward, grad_reg


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _step(method_name: str, model: nn.Module, batch: dict, **hp) -> tuple[dict, dict]:
    out = methods.create(method_name, **hp).compute_loss(model, batch)
    out["total"].backward()
    return out, _grads(model)


def _batch(n_id: int, n_aux: int, size: int, classes: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x_id": torch.randn(n_id, 3, size, size, generator=g),
        "y_id": torch.randint(0, classes, (n_id,), generator=g),
        "x_aux": 2 * torch.randn(n_aux, 3, size, size, generator=g),
    }


def test_batchnorm_train_function_gradgradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return fused_backward.BatchNormTrain.apply(x, w, b, None, None, 0.1, 1e-5)

    ref = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert torch.allclose(f(x, w, b), ref, atol=1e-12)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # 1-d batch norm (features only) takes the same path
    x1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w1, b1 = w[:3].detach().requires_grad_(), b[:3].detach().requires_grad_()
    assert torch.autograd.gradgradcheck(f, (x1, w1, b1))


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_train_function_gradgradcheck(inplace):
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    x[x.abs() < 0.1] = 0.5  # away from the kink, where finite differences are meaningless

    def f(t):
        return fused_backward.ReluTrain.apply(t.clone() if inplace else t, inplace)

    xg = x.clone().requires_grad_(True)
    assert torch.equal(f(xg), torch.relu(x))
    assert torch.autograd.gradcheck(f, (xg,))
    assert torch.autograd.gradgradcheck(f, (xg,))
    # the mode routes every ReLU spelling, in place or not, and leaves grad-free calls alone
    with fused_backward.fused_batchnorm():
        ys = [F.relu(xg), F.relu(xg.clone(), inplace=True), torch.relu(xg), xg.clone().relu_(), xg.relu()]
        free = F.relu(x)
    assert all(type(y.grad_fn).__name__ == "ReluTrainBackward" for y in ys)
    assert all(torch.equal(y, torch.relu(x)) for y in ys) and free.grad_fn is None


def test_fused_mode_updates_running_stats_like_native():
    torch.manual_seed(0)
    native, fused = nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None)
    fused_ref = copy.deepcopy(fused)
    native_ref = copy.deepcopy(native)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    with fused_backward.fused_batchnorm():
        y = native(x)
        fused(x)
        fused(x + 1)
    assert type(y.grad_fn).__name__ == "BatchNormTrainBackward"
    assert torch.equal(y, native_ref(x))
    fused_ref(x)
    fused_ref(x + 1)
    for a, b in zip([*native.buffers(), *fused.buffers()], [*native_ref.buffers(), *fused_ref.buffers()]):
        assert torch.equal(a, b)


# Reduced-depth members of each family (same block code as DenseNet-100 / WRN-40-2 / ResNet-18) keep this
# fast; the full-size comparison is the `--check` of benchmarks/bench_train_step.py.
@pytest.mark.parametrize(
    ("arch", "kwargs", "size"),
    [
        ("densenet100", {"depth": 16}, 16),
        ("wrn40_2", {"depth": 10}, 16),
        ("resnet18", {}, 8),
    ],
)
@pytest.mark.parametrize("reduction", ["official", "paper"])
def test_exact_backend_equals_native_float32(arch, kwargs, size, reduction):
    _check_equals_native(arch, kwargs, size, reduction, "exact")


def test_exact_compiled_backend_equals_native_float32(monkeypatch):
    """torch.compile'd double backward on a DenseNet. Where a C++ compiler is on PATH (what torch.compile
    needs on CPU), the compiled function must have run: a silent eager fallback would pass the comparison."""
    import shutil

    ran, real = [], torch.compile

    def counting_compile(fn, **kwargs):
        compiled = real(fn, **kwargs)

        def call(*args):
            out = compiled(*args)
            ran.append(1)  # only a call that returned: a compile error falls back to eager
            return out

        return call

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(fused_backward, "_COMPILED", {})
    _check_equals_native("densenet100", {"depth": 16}, 16, "official", "exact_compiled")
    if any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        assert ran and not fused_backward._COMPILED.get("failed"), "exact_compiled fell back to eager"


def test_exact_compiled_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused_backward, "_COMPILED", {})
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no compiler here") as rec:
        _check_equals_native("densenet100", {"depth": 10}, 8, "official", "exact_compiled")
    assert len([w for w in rec if "torch.compile failed" in str(w.message)]) == 1


def _check_equals_native(arch, kwargs, size, reduction, backend):
    torch.manual_seed(0)
    base = models.create(arch, num_classes=10, **kwargs).train()
    batch = _batch(3, 5, size)
    with torch.no_grad():
        s = -torch.logsumexp(copy.deepcopy(base)(torch.cat([batch["x_id"], batch["x_aux"]])), dim=1)
    # margins inside each group's energies: some hinges active, some not
    hp = {"m_in": float(s[:3].median()), "m_out": float(s[3:].median()), "grad_reduction": reduction}
    ref_model, fast_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_out, ref_g = _step("greg", ref_model, batch, grad_backend="exact_native", **hp)
    out, g = _step("greg", fast_model, batch, grad_backend=backend, **hp)
    assert ref_out["grad"].item() > 0
    for key in ("total", "grad", "ce", "energy"):
        assert out[key].item() == pytest.approx(ref_out[key].item(), rel=1e-5, abs=0)
    total_norm = torch.cat([v.flatten() for v in ref_g.values()]).norm()
    assert sorted(g) == sorted(ref_g)
    for k in ref_g:
        assert (g[k] - ref_g[k]).norm() <= 1e-5 * max(ref_g[k].norm(), 1e-3 * total_norm), k
    for a, b in zip(fast_model.buffers(), ref_model.buffers()):
        assert torch.equal(a, b)
    assert list(fast_model.state_dict()) == list(base.state_dict())  # nothing renamed: checkpoints load


def test_exact_backend_released_checkpoint_loads_strict(checkpoint_mirror):
    from greg.models import load_pretrained

    path = checkpoint_mirror / "densenet100_cifar10.pth"
    model = load_pretrained(models.create("densenet100", num_classes=10), path)
    keys = list(model.state_dict())
    batch = _batch(2, 2, 32)
    out, _ = _step("greg", model, batch, grad_backend="exact")
    assert torch.isfinite(out["total"])
    assert list(model.state_dict()) == keys
    load_pretrained(model, path)  # strict, into the used model


# ------------------------------------------------------------------------------------ finite differences


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Photo-like inputs: low-frequency content (bilinear upsampling of 4x4 noise) plus a little grain."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return 1.5 * low + 0.1 * torch.randn(n, 3, size, size, generator=g)


def _penalty_grad(model, x_id, x_aux, backend, margins, reduction="official", step=grad_reg.FD_STEP):
    """Parameter gradient of L_grad alone, and the terms, through the methods' own two calls."""
    hp = {
        **grad_reg.grad_defaults("energy"),
        "lambda_grad": 1.0,
        "grad_backend": backend,
        "grad_reduction": reduction,
        "grad_fd_step": step,
    }
    x, logits = grad_reg.forward_concat(model, x_id, x_aux, True, hp)
    terms: dict = {}
    grad_reg.add_grad_terms(terms, x, logits, len(x_id), hp, margins).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return g, terms


@pytest.mark.parametrize(
    ("arch", "kwargs", "reduction"),
    [
        ("densenet100", {"depth": 16}, "official"),
        ("densenet100", {"depth": 16, "drop_rate": 0.2}, "paper"),  # dropout: the same masks must be replayed
        ("wrn40_2", {"depth": 10}, "official"),
    ],
)
def test_fd_gradient_matches_exact(arch, kwargs, reduction):
    torch.manual_seed(0)
    base = models.create(arch, num_classes=10, **kwargs).train()
    x_id, x_aux = _smooth_images(4, 16, 0), 2 * _smooth_images(6, 16, 1)
    with torch.no_grad():
        torch.manual_seed(1)
        s = -torch.logsumexp(copy.deepcopy(base)(torch.cat([x_id, x_aux])), dim=1)
    margins = (float(s[:4].median()), float(s[4:].median()))
    runs = {}
    for backend in ("exact", "fd"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        g, terms = _penalty_grad(model, x_id, x_aux, backend, margins, reduction)
        runs[backend] = (g, terms, [b.clone() for b in model.buffers()], torch.get_rng_state())
    (g_ex, t_ex, buf_ex, rng_ex), (g_fd, t_fd, buf_fd, rng_fd) = runs["exact"], runs["fd"]
    assert t_ex["grad"].item() > 0
    assert t_fd["grad"].item() == pytest.approx(t_ex["grad"].item(), rel=1e-6)  # the value stays exact
    cos = F.cosine_similarity(g_fd, g_ex, dim=0).item()
    rel_norm = abs(g_fd.norm().item() / g_ex.norm().item() - 1)
    assert cos >= 0.999 and rel_norm <= 0.01, (cos, rel_norm)
    # the extra forward left the running statistics and the RNG stream as the exact path leaves them
    for a, b in zip(buf_fd, buf_ex):
        assert torch.equal(a, b)
    assert torch.equal(rng_fd, rng_ex)


def test_fd_needs_its_forward():
    model = TinyNet()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="forward_concat"):
        grad_reg.fd_gradient_penalty(x, model(x)[:, 0], 2, 0.0, 0.0, "official", lambda z: z[:, 0])


def test_fd_training_curve_matches_exact():
    """A short training run (SGD, 40 steps) with fd follows the exact run's loss curve."""
    g = torch.Generator().manual_seed(0)
    x_id, x_aux = _smooth_images(8, 8, 2), 2 * _smooth_images(16, 8, 3)
    y_id = torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    base = TinyNet(c_in=3, width=8, k=3)
    curves = {}
    for backend in ("exact", "fd"):
        model = copy.deepcopy(base).train()
        method = methods.create("greg", grad_backend=backend, m_in=-2.0, m_out=-0.5, lambda_grad=5.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        curve = []
        for i in range(25):
            lo, hi = (i % 2) * 4, (i % 2) * 4 + 4
            batch = {"x_id": x_id[lo:hi], "y_id": y_id[lo:hi], "x_aux": x_aux[2 * lo : 2 * hi]}
            opt.zero_grad()
            out = method.compute_loss(model, batch)
            out["total"].backward()
            opt.step()
            curve.append(out["total"].item())
        curves[backend] = torch.tensor(curve)
    ex, fd = curves["exact"], curves["fd"]
    assert ex[-5:].mean() < 0.9 * ex[:5].mean()  # it trains
    assert (fd - ex).abs().max().item() <= 0.01 * ex.abs().max().item(), (ex, fd)


def _photo_crops(n: int, seed: int) -> torch.Tensor:
    """Square crops (random position and size) of scikit-image sample photos, resized to 32x32 and normalized
    with the CIFAR-10 statistics: the input scale and smoothness the released checkpoint was trained on."""
    import numpy as np
    import skimage.data
    import skimage.transform

    from greg.data.catalog import CIFAR10_MEAN, CIFAR10_STD

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "cat")]
    rows = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.integers(64, min(h, w)))
        top, left = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        crop = skimage.transform.resize(img[top : top + s, left : left + s], (32, 32), anti_aliasing=True)
        rows.append((crop - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD))
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float().contiguous()


@pytest.mark.timeout(300)
def test_fd_gradient_matches_exact_released_densenet100(checkpoint_mirror):
    """The accuracy targets of docs/METHOD.md ("Finite-difference gradient regularization") on the released DenseNet-100 CIFAR-10 weights (a trained, sharp network:
    the former input-relative step reached only cosine 0.53-0.83 here), batch 4 ID + 8 aux, train mode."""
    from greg.models import load_pretrained

    torch.manual_seed(0)
    base = load_pretrained(
        models.create("densenet100", num_classes=10), checkpoint_mirror / "densenet100_cifar10.pth"
    )
    base.train()
    x_id, x_aux = _photo_crops(4, 0), _photo_crops(8, 1)
    with torch.no_grad():
        s = -torch.logsumexp(copy.deepcopy(base)(torch.cat([x_id, x_aux])), dim=1)
    margins = (float(s[:4].median()), float(s[4:].median()))  # some hinges active in each group
    g_ex, t_ex = _penalty_grad(copy.deepcopy(base), x_id, x_aux, "exact", margins)
    g_fd, t_fd = _penalty_grad(copy.deepcopy(base), x_id, x_aux, "fd", margins)
    assert t_ex["grad"].item() > 0
    assert t_fd["grad"].item() == pytest.approx(t_ex["grad"].item(), rel=1e-6)
    cos = F.cosine_similarity(g_fd, g_ex, dim=0).item()
    rel_norm = abs(g_fd.norm().item() / g_ex.norm().item() - 1)
    assert cos >= 0.999 and rel_norm <= 0.01, (cos, rel_norm)
