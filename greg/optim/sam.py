"""Sharpness-aware minimization (Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021), plain and normalization-layers-only.

One SAM update with step size ``h`` on the loss ``L``, for the perturbed subset ``P`` of the parameters:

    g   = grad L(w)                                  (first forward/backward, at w)
    e_P = rho * g_P / ||g_P||_2,  e_{not P} = 0      (norm over the grads of P only)
    g'  = grad L(w + e)                              (second forward/backward, at the perturbed point)
    w  <- base_optimizer_step(w, g')                 (after restoring w exactly; ALL parameters step)

Plain SAM: ``P`` = every parameter. SAM-only-norm (the OOD appendix; "SAM-ON", Mueller et al., NeurIPS
2023): ``P`` = the affine parameters (weight and bias) of the normalization layers (BatchNorm, GroupNorm,
LayerNorm, ... found by module type, :func:`norm_parameters`).

Differences from the reference implementation (github.com/davda54/sam): the base optimizer is an existing
instance (the trainer builds it from the run config), ``w`` is restored from a saved copy (bit-exact, not
``w + e - e``), no per-step state survives :meth:`SAM.second_step` (so checkpointing the base optimizer is
enough for an exact resume), and batch-norm running statistics are saved and restored around the second
forward by :func:`frozen_norm_stats` instead of davda54's ``momentum = 0`` trick (which still increments
``num_batches_tracked`` and breaks for ``momentum=None``, the cumulative average).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def is_norm_module(module: nn.Module) -> bool:
    """BatchNorm*/SyncBatchNorm/InstanceNorm* (``_NormBase``), GroupNorm, LayerNorm, RMSNorm, LRN."""
    return isinstance(module, _NORM_TYPES)


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters owned directly by normalization modules, in ``model.parameters()`` order."""
    ids = {
        id(p)
        for m in model.modules()
        if is_norm_module(m)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    }
    return [p for p in model.parameters() if id(p) in ids]


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Forwards inside leave the running statistics of every batch-norm-like layer as they were.

    Saves ``running_mean``, ``running_var`` and ``num_batches_tracked`` on entry and copies them back
    (in place) on exit: SAM's second forward then uses batch statistics as usual but does not count twice.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            saved.append(
                (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
            )
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)


class SAM(torch.optim.Optimizer):
    """SAM around an existing base optimizer (SGD, Adam, ...), sharing its ``param_groups`` and state.

    Args:
        base_optimizer: the optimizer that applies the update with the gradient at the perturbed point.
        rho: radius of the perturbation (Foret et al. use 0.05 for CIFAR with SGD).
        perturb: the parameters to perturb; ``None`` = all parameters of ``base_optimizer`` (plain SAM).
            Use :meth:`only_norm` for SAM-only-norm.
        eps: added to the gradient norm (davda54: 1e-12), so a zero gradient gives a zero perturbation.

    Usage (two forward/backward passes per step)::

        loss_fn(model(x)).backward(); sam.first_step(zero_grad=True)
        with frozen_norm_stats(model):
            loss_fn(model(x)).backward()
        sam.second_step(zero_grad=True)

    or ``sam.step(closure)`` with a closure that zeroes nothing and returns the loss after ``backward``.
    ``state_dict`` / ``load_state_dict`` are the base optimizer's.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        perturb: Iterable[torch.Tensor] | None = None,
        eps: float = 1e-12,
    ):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"SAM wraps a torch.optim.Optimizer instance, got {type(base_optimizer).__name__}"
            )
        if not rho >= 0.0:
            raise ValueError(f"SAM rho must be >= 0, got {rho!r}")
        params = [p for g in base_optimizer.param_groups for p in g["params"]]
        super().__init__(params, {"rho": float(rho)})
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # same dicts: LR changes reach the base optimizer
        self.state = base_optimizer.state
        self.rho = float(rho)
        self.eps = float(eps)
        if perturb is None:
            self.perturb = params
        else:
            known = {id(p) for p in params}
            self.perturb = list(perturb)
            foreign = [i for i, p in enumerate(self.perturb) if id(p) not in known]
            if foreign:
                raise ValueError(f"SAM perturb: parameters {foreign} are not optimized by the base optimizer")
            if not self.perturb:
                raise ValueError("SAM perturb: empty parameter list (a model without normalization layers?)")
        self._old: dict[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def only_norm(
        cls, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float, eps: float = 1e-12
    ) -> SAM:
        """SAM-only-norm: perturb only :func:`norm_parameters` of ``model``."""
        return cls(base_optimizer, rho, perturb=norm_parameters(model), eps=eps)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """``||g_P||_2`` over the perturbed parameters that have a gradient (0 if none has)."""
        grads = [p.grad for p in self.perturb if p.grad is not None]
        if not grads:
            return torch.zeros(())
        device = grads[0].device
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> torch.Tensor:
        """Move to ``w + rho * g_P / ||g_P||`` (saving ``w``); returns ``||g_P||``."""
        if self._old is not None:
            raise RuntimeError("SAM.first_step called twice without second_step")
        norm = self.grad_norm()
        scale = self.rho / (norm + self.eps)
        self._old = {}
        for p in self.perturb:
            if p.grad is None:
                continue
            self._old[p] = p.detach().clone()
            p.add_(p.grad * scale.to(p.device, p.dtype))
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` (bit-exact) without stepping."""
        if self._old is None:
            raise RuntimeError("SAM: restore/second_step called before first_step")
        for p, old in self._old.items():
            p.copy_(old)
        self._old = None  # nothing carried over to the next step

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly and apply the base optimizer with the current (perturbed-point) gradient."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(  # type: ignore[override]
        self, closure: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Full SAM step; ``closure`` does a forward and backward (no zero_grad) and returns the loss.

        The gradient of the first pass must already be in ``.grad`` (as after ``loss.backward()``);
        the closure is called once, at the perturbed point, with normalization running stats frozen
        only if the caller wraps it (the optimizer does not know the model).
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
