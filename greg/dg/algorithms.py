"""DomainBed-style domain-generalization algorithms (Gulrajani & Lopez-Paz 2021).

Each algorithm owns its network and optimizer and exposes ``update(minibatches) -> dict[str, float]``
(``minibatches`` = one ``(x, y)`` per training domain) and ``predict(x) -> logits``.

Penalized algorithms (IRM, V-REx, Fishr, HGP, Hutchinson) follow the IRM protocol: the penalty weight
is 1 for the first ``penalty_anneal_iters`` updates, then ``penalty_weight``; at the switch Adam is
re-created (DomainBed; the original IRM script keeps it, set ``reset_optimizer_at_anneal=False``), and
with ``rescale_loss`` the whole loss is divided by the weight once it exceeds 1 (IRM script).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from greg.dg import penalties as P
from greg.dg.networks import DGNetwork
from greg.registry import Registry

DG_ALGORITHMS: Registry[Algorithm] = Registry("DG algorithm")

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class Algorithm(nn.Module):
    """Base class: network, Adam, explicit L2, penalty annealing and loss rescaling."""

    penalized = False  # uses the annealed penalty weight
    grayscale = False

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        num_domains: int,
        hparams: dict[str, Any],
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        super().__init__()
        self.hparams = dict(hparams)
        self.num_domains = num_domains
        self.network = DGNetwork(
            input_shape,
            num_outputs,
            width=int(hparams["mlp_width"]),
            depth=int(hparams.get("mlp_depth", 3)),
            grayscale=self.grayscale,
        ).to(device)
        self.optimizer = self._make_optimizer()
        self.update_count = 0
        # Explicit generator for stochastic penalties (Hutchinson); CPU so runs match across devices.
        self.generator = torch.Generator().manual_seed(int(seed))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.network.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    def current_penalty_weight(self) -> float:
        if not self.penalized:
            return 1.0
        if self.update_count >= self.hparams["penalty_anneal_iters"]:
            return float(self.hparams["penalty_weight"])
        return 1.0

    def _step(self, objective: torch.Tensor, weight: float = 1.0) -> float:
        """Add L2, rescale, reset Adam at the anneal switch, take one optimizer step."""
        l2 = self.hparams.get("l2", 0.0)
        if l2:
            objective = objective + l2 * sum(p.pow(2).sum() for p in self.network.parameters())
        if self.hparams.get("rescale_loss", False) and weight > 1.0:
            objective = objective / weight
        anneal = self.hparams.get("penalty_anneal_iters", 0)
        if (
            self.penalized
            and self.hparams.get("reset_optimizer_at_anneal", True)
            and anneal > 0
            and self.update_count == anneal
        ):
            self.optimizer = self._make_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        self.update_count += 1
        return objective.item()

    def _penalized_step(
        self, losses: torch.Tensor, penalty: torch.Tensor, **logged: float
    ) -> dict[str, float]:
        """One step on ``mean_e L_e + w * penalty`` with the annealed weight ``w``; the logged numbers."""
        w = self.current_penalty_weight()
        nll = losses.mean()
        loss = self._step(nll + w * penalty, w)
        return {"loss": loss, "nll": nll.item(), "penalty": penalty.item(), "penalty_weight": w, **logged}

    def _forward_domains(self, minibatches: Minibatches):
        feats, logits, losses = [], [], []
        for x, y in minibatches:
            h = self.network.features(x)
            z = self.network.head(h)
            feats.append(h)
            logits.append(z)
            losses.append(P.classification_loss(z, y))
        return feats, logits, torch.stack(losses)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def update(self, minibatches: Minibatches) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    # The trainer checkpoints whole restarts, so no optimizer state needs to survive a resume.


@DG_ALGORITHMS.register("erm")
class ERM(Algorithm):
    """Empirical risk minimization: ``mean_e L_e`` (Vapnik 1998)."""

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        _, _, losses = self._forward_domains(minibatches)
        nll = losses.mean()
        loss = self._step(nll)
        return {"loss": loss, "nll": nll.item()}


@DG_ALGORITHMS.register("oracle")
class Oracle(ERM):
    """ERM on grayscale inputs (colour channels summed): the IRM paper's "grayscale model" oracle."""

    grayscale = True


@DG_ALGORITHMS.register("irm")
class IRM(Algorithm):
    """IRMv1 (Arjovsky et al. 2019): ``mean_e L_e + w * mean_e ||d L_e(s * f) / ds|_{s=1}||^2``."""

    penalized = True

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        _, logits, losses = self._forward_domains(minibatches)
        penalty = torch.stack([P.irm_penalty(z, y) for z, (_, y) in zip(logits, minibatches)]).mean()
        return self._penalized_step(losses, penalty)


@DG_ALGORITHMS.register("vrex")
class VREx(Algorithm):
    """V-REx (Krueger et al. 2021): ``mean_e L_e + w * Var_e(L_e)``."""

    penalized = True

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        _, _, losses = self._forward_domains(minibatches)
        penalty = P.vrex_penalty(losses)
        return self._penalized_step(losses, penalty)


@DG_ALGORITHMS.register("fishr")
class Fishr(Algorithm):
    """Fishr (Rame et al. 2022): ``mean_e L_e + w * mean_e ||v_e - mean v||^2``.

    ``v_e`` = per-coordinate variance of the per-sample head gradients in domain e, optionally smoothed
    by DomainBed's moving average (``ema``; with the ``1/(1-ema)`` correction).
    """

    penalized = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ema_prev: list[torch.Tensor | None] = [None] * self.num_domains

    def _smooth(self, e: int, v: torch.Tensor) -> torch.Tensor:
        ema = float(self.hparams.get("ema", 0.0))
        if ema <= 0:
            return v
        prev = self._ema_prev[e]
        prev = torch.zeros_like(v) if prev is None else prev
        out = (ema * prev + (1 - ema) * v) / (1 - ema)
        self._ema_prev[e] = out.detach().clone()
        return out

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        feats, _, losses = self._forward_domains(minibatches)
        variances = []
        for e, (h, (_, y)) in enumerate(zip(feats, minibatches)):
            grads = P.per_sample_head_gradients(self.network.head, h, y)
            variances.append(self._smooth(e, P.gradient_variance(grads)))
        penalty = P.fishr_penalty(variances)
        return self._penalized_step(losses, penalty)


@DG_ALGORITHMS.register("coral")
class CORAL(Algorithm):
    """Deep CORAL (Sun & Saenko 2016), DomainBed form: ``mean_e L_e + gamma * mean_pairs mmd(h_i, h_j)``."""

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        feats, _, losses = self._forward_domains(minibatches)
        penalty = P.coral_penalty(feats)
        nll = losses.mean()
        loss = self._step(nll + self.hparams["mmd_gamma"] * penalty)
        return {"loss": loss, "nll": nll.item(), "penalty": penalty.item()}


class _HessianAlignment(Algorithm):
    """Hessian + gradient alignment of the classifier head (Hemati et al., ICCV 2023, Eq. 11).

    ``mean_e L_e + w * (alpha * mean_e ||A_e - mean A||^2 + beta * mean_e ||g_e - mean g||^2)`` with
    ``g_e`` the head gradient of ``L_e`` and ``A_e`` a matrix-free Hessian statistic (subclasses).
    """

    penalized = True

    def hessian_term(self, loss: torch.Tensor, params: list[torch.Tensor]):
        raise NotImplementedError

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        _, _, losses = self._forward_domains(minibatches)
        params = list(self.network.head.parameters())
        grads, hess = [], []
        for loss_e in losses:
            g, a = self.hessian_term(loss_e, params)
            grads.append(g)
            hess.append(a)
        hess_pen = P.alignment_penalty(hess)
        grad_pen = P.alignment_penalty(grads)
        penalty = self.hparams["alpha"] * hess_pen + self.hparams["beta"] * grad_pen
        return self._penalized_step(
            losses, penalty, hess_penalty=hess_pen.item(), grad_penalty=grad_pen.item()
        )


@DG_ALGORITHMS.register("hgp")
class HGP(_HessianAlignment):
    """HGP: ``A_e = H_e g_e = ||g_e|| * grad ||g_e||`` (double backprop through the head)."""

    def hessian_term(self, loss, params):
        return P.hessian_gradient_product(loss, params)


@DG_ALGORITHMS.register("hutchinson")
class Hutchinson(_HessianAlignment):
    """Hutchinson: ``A_e = diag(H_e) ~ mean_z z * (H_e z)``, ``hutchinson_draws`` Rademacher draws."""

    def hessian_term(self, loss, params):
        return P.hutchinson_diagonal(loss, params, int(self.hparams["hutchinson_draws"]), self.generator)


def create(
    name: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    num_domains: int,
    hparams: dict[str, Any],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Algorithm:
    return DG_ALGORITHMS.create(
        name, input_shape, num_outputs, num_domains, hparams, device=device, seed=seed
    )
