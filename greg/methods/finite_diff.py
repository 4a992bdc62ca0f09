"""The finite-difference parameter gradient of the gradient regularizer (``grad_backend: fd`` of
``greg.methods.grad_reg``; the double-backprop backends are :mod:`greg.methods.fused_backward`).

``fd``: no double backprop. For ``L = sum_i w_i ||G_i||`` with ``G = dJ/dx`` and ``u_i = G_i / ||G_i||``,
``dL/dtheta = d/dtheta [sum_i w_i u_i . G_i]`` with ``u`` held fixed, and ``sum_i v_i . G_i`` (``v_i = w_i u_i``)
is the directional derivative of ``J`` along ``v``; so ``dL/dtheta ~= dJ(x + eps v)/dtheta - dJ(x)/dtheta``,
over ``eps``: two first-order backward passes (Karakida et al., ICML 2023, applied here to the input
gradient). docs/METHOD.md, "Finite-difference gradient regularization", has the step-size rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from greg.methods.fused_backward import RELU_INPLACE, batch_norm_args


class RngState:
    """The CPU and (if ``device`` is CUDA) device RNG states, so a second forward draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _NoRunningStatsMode(TorchFunctionMode):
    """Train-mode ``F.batch_norm`` calls normalize with the batch statistics but leave the running ones alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = batch_norm_args(*args, **kwargs)
            if bound["training"]:
                bound.update(running_mean=None, running_var=None)
                return func(**bound)
        return func(*args, **kwargs)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """A forward inside has no lasting effect on the buffers: train-mode batch norms do not update their
    running statistics (which the training forward's graph saved, so they must not even be rewritten), and
    any other buffer changed in place (``num_batches_tracked``) gets its old value back."""
    saved = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    try:
        with _NoRunningStatsMode():
            yield
    finally:
        with torch.no_grad():
            for b, version, v in saved:
                if b._version != version:
                    b.copy_(v)


@contextlib.contextmanager
def replayed_rng(before: RngState | None) -> Iterator[None]:
    """Inside: the RNG streams as they were at ``before``; on exit, as they were on entry."""
    if before is None:
        yield
        return
    after = RngState(before.device)
    before.restore()
    try:
        yield
    finally:
        after.restore()


_RELUS = tuple(RELU_INPLACE)  # every ReLU spelling, as in the exact mode


class ReluGates(TorchFunctionMode):
    """Records the ReLU outputs of one forward, then (``replay``) makes a second forward's ReLUs use the
    first one's gates: ``relu(z') -> z' * 1{z > 0}``.

    Why: the exact ``G`` is differentiated with ReLU'' = 0 (gates held fixed); a finite difference of
    ``dJ/dtheta`` across a gate that flips picks up a jump instead (a DenseNet has millions of gates, so some
    always flip), which does not shrink with the step. With the gates frozen the difference converges to
    the double-backprop value. A call whose recorded output was since changed in place is left alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[torch.Tensor, int]] = []
        self.replaying = False
        self._i = 0

    def replay(self) -> ReluGates:
        self.replaying, self._i = True, 0
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        if not self.replaying:
            out = func(*args, **kwargs)
            self.outputs.append((out, out._version))
            return out
        i, self._i = self._i, self._i + 1
        z = args[0]
        if i < len(self.outputs):
            ref, version = self.outputs[i]
            if ref._version == version and ref.shape == z.shape:
                # z' * 1{z > 0} in one kernel; its backward is the same gating (the mask needs no graph)
                return torch.ops.aten.threshold_backward(z, ref.detach(), 0)
        return func(*args, **kwargs)


def fd_step_size(coef: torch.Tensor, value: torch.Tensor, step: float) -> float:
    """``eps`` of the finite difference along ``v``: chosen so that the first-order change of the hinge-weighted
    scores, ``eps * sum_i v_i . G_i / sum_i |c_i| = eps * L / sum_i |c_i|``, is ``step`` score units (nats for
    the energy). Measuring the step by what the network outputs, not by the input scale, keeps it as linear
    on a trained, sharp network as on a fresh one (docs/METHOD.md, "Finite-difference gradient
    regularization": an input-relative step that is fine on a fresh net moved a trained DenseNet's energies
    by nats)."""
    return float(step) * float(coef.abs().sum()) / max(float(value), 1e-30)


def fd_surrogate(
    model: nn.Module,
    x: torch.Tensor,
    g: torch.Tensor,
    row_weights: torch.Tensor,
    coef: torch.Tensor,
    j_lin_base: torch.Tensor,
    score_fn: Any,
    step: float,
    rng_before: RngState | None,
    gates: ReluGates | None = None,
) -> torch.Tensor:
    """A scalar whose parameter gradient is ``d/dtheta sum_i w_i ||G_i||`` up to O(step) (its value is not).

    ``g``: ``G = dJ/dx`` (detached); ``row_weights``: ``w_i``; ``coef``: ``c_i = dJ/dS_i`` at ``x`` (the hinge
    activity, frozen so the difference does not cross a hinge's kink); ``j_lin_base``: ``sum_i c_i S_i(x)``
    on the training forward's graph (its backward gives ``-dJ(x)/dtheta``). The extra forward of
    ``x + eps v`` runs in the model's current modes (train-mode batch norm uses that batch's statistics,
    as the exact ``G`` does), leaves the buffers unchanged and replays the training forward's RNG stream.
    """
    norms = torch.linalg.vector_norm(g.flatten(1), ord=2, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    u = g / safe.view(-1, *([1] * (g.dim() - 1)))
    v = u * row_weights.view(-1, *([1] * (g.dim() - 1)))
    value = (row_weights * norms).sum()
    if not bool(value > 0):
        return j_lin_base.new_zeros(())
    eps = fd_step_size(coef, value, step)
    x_pert = (x.detach() + eps * v).requires_grad_(False)
    with (
        frozen_buffers(model),
        replayed_rng(rng_before),
        gates.replay() if gates else contextlib.nullcontext(),
    ):
        s_pert = score_fn(model(x_pert))
    j_lin_pert = (coef * s_pert).sum()
    return (j_lin_pert - j_lin_base) / eps
