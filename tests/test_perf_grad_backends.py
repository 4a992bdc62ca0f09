"""grad_backend "exact" (hand-written batch-norm double backward) and "fd" (finite difference) against the
reference double backprop ("exact_native", PyTorch's own batch norm)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greg import methods, models
from greg.methods import grad_backends


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
        return grad_backends.BatchNormTrain.apply(x, w, b, None, None, 0.1, 1e-5)

    ref = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert torch.allclose(f(x, w, b), ref, atol=1e-12)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # 1-d batch norm (features only) takes the same path
    x1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w1, b1 = w[:3].detach().requires_grad_(), b[:3].detach().requires_grad_()
    assert torch.autograd.gradgradcheck(f, (x1, w1, b1))


def test_fused_mode_updates_running_stats_like_native():
    torch.manual_seed(0)
    native, fused = nn.BatchNorm2d(4), nn.BatchNorm2d(4, momentum=None)
    fused_ref = copy.deepcopy(fused)
    native_ref = copy.deepcopy(native)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    with grad_backends.fused_batchnorm():
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
    torch.manual_seed(0)
    base = models.create(arch, num_classes=10, **kwargs).train()
    batch = _batch(3, 5, size)
    with torch.no_grad():
        s = -torch.logsumexp(copy.deepcopy(base)(torch.cat([batch["x_id"], batch["x_aux"]])), dim=1)
    # margins inside each group's energies: some hinges active, some not
    hp = {"m_in": float(s[:3].median()), "m_out": float(s[3:].median()), "grad_reduction": reduction}
    ref_model, fast_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_out, ref_g = _step("greg", ref_model, batch, grad_backend="exact_native", **hp)
    out, g = _step("greg", fast_model, batch, grad_backend="exact", **hp)
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
