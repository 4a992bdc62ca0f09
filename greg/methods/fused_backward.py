"""The fused double backward of the gradient regularizer's ``exact`` / ``exact_compiled`` backends
(``grad_backend`` of ``greg.methods.grad_reg``; the finite-difference ``fd`` is :mod:`greg.methods.finite_diff`).

``exact``: the same double backprop as ``exact_native`` (PyTorch's own batch norm), but every train-mode
batch norm of the training forward runs as :class:`BatchNormTrain`, whose backward is itself an autograd
``Function`` with a hand-written backward (the batch-norm *double* backward, a dozen whole-tensor ops per
layer). PyTorch composes that double backward from ~30 elementwise ops per layer, which was ~45 % of a
GReg step on CPU (benchmarks/README.md). Parameters and buffers are untouched (checkpoints load as before);
only the autograd graph differs, so values and gradients agree to float rounding. Train-mode ReLUs run as
:class:`ReluTrain`, whose backward declares that it does not depend on the ReLU output: PyTorch's own
double backward of a ReLU sends a full tensor of zeros back through the network (~8 % of a step).

``exact_compiled``: ``exact`` with the batch-norm double backward compiled by ``torch.compile`` (fused
reductions and elementwise kernels instead of a dozen passes; half the eager time in a DenseNet-100 step on
CPU, benchmarks/README.md). Needs a working compiler (a C++ compiler on CPU, Triton on CUDA) and costs a
one-off compile per process (about 20 s on CPU); if compiling fails it warns once and runs the eager
``exact`` code, which gives the same values.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


class _BatchNormBackward(torch.autograd.Function):
    """``(gx, gw, gb) = batch-norm backward(gy; x, weight)`` (train mode), with an explicit backward.

    Forward: PyTorch's fused backward kernel. Backward (the double backward), per channel, with
    ``r = invstd``, ``xh = (x - mean) r``, ``M`` elements, ``gbar = mean(gy)``, ``a = mean(gy xh)``,
    ``S1 = sum ggx``, ``S2 = sum ggx xh``, ``q = sum ggx (gy - gbar - xh a)`` and cotangents
    ``ggx, ggw, ggb`` of ``gx, gw, gb``::

        B     = ggw - w r S2 / M
        d gy  = w r ggx + B xh + ggb - w r S1 / M
        d w   = r q
        d x   = r h - r mean(h) - xh (r mean(h xh) + r^2 w q / M),   h = -w r a ggx + B gy
    """

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps, compiled=False):  # type: ignore[override]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.compiled = compiled
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):  # type: ignore[override]
        gy, x, weight, mean, invstd, gw, gb = ctx.saved_tensors
        if ctx.compiled:
            # weight.detach(): dynamo keeps a Parameter's shape static, which would pin every channel count
            out = _compiled_double_backward(gy, x, weight.detach(), mean, invstd, gw, gb, ggx, ggw, ggb)
            if out is not None:
                return (*out, None, None, None, None)
        return (*_double_backward(gy, x, weight, mean, invstd, gw, gb, ggx, ggw, ggb), None, None, None, None)


def _double_backward(gy, x, weight, mean, invstd, gw, gb, ggx, ggw, ggb):  # type: ignore[no-untyped-def]
    """``(d gy, d x, d w)`` of :class:`_BatchNormBackward` (formulas in its docstring); ``ggx``, ``ggw``,
    ``ggb`` may be None (no cotangent)."""
    nd = x.dim()
    m = x.numel() // x.shape[1]
    r = invstd
    wr = weight * r
    xh = (x - _channel_view(mean, nd)) * _channel_view(r, nd)
    zeros = torch.zeros_like(r)
    ggw = zeros if ggw is None else ggw
    ggb = zeros if ggb is None else ggb
    gbar, a = gb / m, gw / m
    if ggx is None:
        s1 = s2 = q = zeros
    else:
        s1 = _channel_sum(ggx)
        s2 = _channel_sum(ggx * xh)
        q = _channel_sum(ggx * gy) - gbar * s1 - a * s2
    coef_b = ggw - wr * s2 / m
    coef_a = -wr * a
    mean_h = coef_a * s1 / m + coef_b * gbar
    mean_hxh = coef_a * s2 / m + coef_b * a
    c_xh = -(r * mean_hxh + r * r * weight * q / m)
    d_x = gy * _channel_view(r * coef_b, nd)
    d_x.addcmul_(xh, _channel_view(c_xh, nd)).add_(_channel_view(-r * mean_h, nd))
    d_gy = xh * _channel_view(coef_b, nd)
    d_gy.add_(_channel_view(ggb - wr * s1 / m, nd))
    if ggx is not None:
        d_x.addcmul_(ggx, _channel_view(r * coef_a, nd))
        d_gy.addcmul_(ggx, _channel_view(wr, nd))
    return d_gy, d_x, r * q


_COMPILED: dict[str, Any] = {}


def _compiled_double_backward(*args: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    """:func:`_double_backward` through ``torch.compile`` (built on first use); None, after one warning,
    where compiling does not work here (the caller then runs the eager code)."""
    if _COMPILED.get("failed"):
        return None
    fn = _COMPILED.get("fn")
    try:
        if fn is None:
            fn = _COMPILED["fn"] = torch.compile(_double_backward, dynamic=True)
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same math, eager
        _COMPILED["failed"] = True
        warnings.warn(
            f"grad_backend 'exact_compiled': torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
            "using the eager batch-norm double backward (same values, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


class BatchNormTrain(torch.autograd.Function):
    """Train-mode batch norm (batch statistics; running statistics updated in place exactly as
    ``F.batch_norm`` does) whose backward is :class:`_BatchNormBackward`, so double backprop through it
    uses the hand-written double backward instead of PyTorch's composite one."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, compiled=False):  # type: ignore[override]
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.compiled = eps, compiled
        return out

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps, ctx.compiled)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 5


class _ReluGradient(torch.autograd.Function):
    """``threshold_backward(gy, out, 0)`` (ReLU's backward), differentiable in ``gy`` only: the ReLU output
    is a gate, and its derivative (0 almost everywhere) is not sent back as a tensor of zeros."""

    @staticmethod
    def forward(ctx, gy, out):  # type: ignore[override]
        ctx.save_for_backward(out)
        return torch.ops.aten.threshold_backward(gy, out, 0)

    @staticmethod
    def backward(ctx, ggy):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _ReluGradient.apply(ggy, out), None


class ReluTrain(torch.autograd.Function):
    """``relu(x)`` (in place if asked) whose backward is :class:`_ReluGradient`: the same values and
    gradients as PyTorch's ReLU, and a double backward without the zeros."""

    @staticmethod
    def forward(ctx, x, inplace=False):  # type: ignore[override]
        if inplace:
            out = x.clamp_min_(0)
            ctx.mark_dirty(out)
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _ReluGradient.apply(gy, out), None


# Every spelling of a ReLU call -> whether it is in place (None: F.relu's own ``inplace`` argument).
RELU_INPLACE = {
    F.relu: None,
    torch.relu: False,
    torch.Tensor.relu: False,
    torch.relu_: True,
    torch.Tensor.relu_: True,
}


class _FusedBatchNormMode(TorchFunctionMode):
    """Routes train-mode, affine ``F.batch_norm`` calls (what ``nn.BatchNorm*`` calls) to
    :class:`BatchNormTrain` and ReLUs that need a gradient to :class:`ReluTrain`."""

    def __init__(self, compiled: bool = False) -> None:
        super().__init__()
        self.compiled = compiled

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_INPLACE and torch.is_grad_enabled() and args and args[0].requires_grad:
            inplace = RELU_INPLACE[func]
            if inplace is None:  # F.relu(input, inplace=False)
                inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
            return ReluTrain.apply(args[0], inplace)
        if func is F.batch_norm:
            bound = batch_norm_args(*args, **kwargs)
            if bound["training"] and bound["weight"] is not None and bound["bias"] is not None:
                momentum = bound["momentum"]
                return BatchNormTrain.apply(
                    bound["input"],
                    bound["weight"],
                    bound["bias"],
                    bound["running_mean"],
                    bound["running_var"],
                    0.0 if momentum is None else float(momentum),
                    float(bound["eps"]),
                    self.compiled,
                )
        return func(*args, **kwargs)


def batch_norm_args(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
) -> dict[str, Any]:
    return {
        "input": input,
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
        "training": training,
        "momentum": momentum,
        "eps": eps,
    }


@contextlib.contextmanager
def fused_batchnorm(compiled: bool = False) -> Iterator[None]:
    """Inside: every train-mode affine batch norm is recorded as :class:`BatchNormTrain` and every ReLU
    as :class:`ReluTrain` (same values, cheaper double backward; ``compiled``: the batch-norm double
    backward through ``torch.compile``). Only the forward needs to run inside; backward passes may run
    outside."""
    with _FusedBatchNormMode(compiled):
        yield
