"""Pure penalty functions of the DG algorithms (no state, no RNG except an explicit generator).

Every function works on the *classifier head* only where a gradient / Hessian is involved, as in the
Hessian-alignment paper (Hemati et al., ICCV 2023, arXiv 2308.11778, Sec. 4) and in Fishr.
All outputs stay differentiable (``create_graph=True``) so the penalty can be minimized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BCE-with-logits for a single logit (IRM Colored-MNIST protocol), cross-entropy otherwise."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y.float(), reduction=reduction)
    return F.cross_entropy(logits, y.long(), reduction=reduction)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    pred = (logits.squeeze(-1) > 0).long() if logits.shape[-1] == 1 else logits.argmax(dim=-1)
    return (pred == y.long()).float().mean().item()


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --------------------------------------------------------------------------------------------- IRM / V-REx
def irm_penalty(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = classification_loss) -> torch.Tensor:
    """IRMv1 (Arjovsky et al. 2019): ``||d/dw L(w * logits)|_{w=1}||^2`` on a dummy scalar scale ``w``."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    loss = loss_fn(logits * scale, y)
    (g,) = torch.autograd.grad(loss, [scale], create_graph=True)
    return g.pow(2).sum()


def vrex_penalty(risks: torch.Tensor) -> torch.Tensor:
    """V-REx (Krueger et al. 2021, DomainBed form): variance of the domain risks ``mean_e (R_e - mean R)^2``."""
    return (risks - risks.mean()).pow(2).mean()


# ------------------------------------------------------------------------------------------- alignment
def alignment_penalty(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_e ||v_e - mean_e' v_e'||^2`` over domains (used for A_e = H_e g_e or diag H_e, and for g_e)."""
    v = torch.stack([t.reshape(-1) for t in vectors])
    return (v - v.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()


# ------------------------------------------------------------------------------------------ head Hessian
def head_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flat gradient ``g = dL/dθ_head``, kept in the graph."""
    return flat(torch.autograd.grad(loss, list(params), create_graph=True))


def hessian_gradient_product(
    loss: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """HGP (Hemati et al. 2023, Eq. 12): ``H g = ||g|| * grad_θ ||g||`` by double backprop.

    Since ``grad ||g|| = H g / ||g||``, the product equals the Hessian-vector product with ``v = g``
    without forming H. A 1e-30 floor inside the square root keeps ``g = 0`` finite. Returns ``(g, H g)``.
    """
    params = list(params)
    g = head_gradient(loss, params)
    norm = torch.sqrt(g.pow(2).sum() + 1e-30)
    dnorm = flat(torch.autograd.grad(norm, params, create_graph=True))
    return g, norm * dnorm


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    # Draw on the generator's device (CPU by default) so results do not depend on the accelerator.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randint(0, 2, shape, generator=generator, device=gen_device)
    return (2 * z - 1).to(device=device, dtype=dtype)


def hutchinson_diagonal(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    draws: int,
    generator: torch.Generator | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimator of ``diag(H)`` (Bekas et al. 2007; Hemati et al. 2023, Eq. 14).

    ``diag(H) ~= mean_z z * (H z)`` with Rademacher ``z`` and ``H z = grad_θ (g . z)``; the draws are
    batched through ``is_grads_batched`` (``chunk`` at a time). Returns ``(g, diag estimate)``.
    """
    params = list(params)
    g = head_gradient(loss, params)
    total = torch.zeros_like(g)
    done = 0
    while done < draws:
        k = min(chunk, draws - done)
        z = rademacher((k, g.numel()), generator, g.device, g.dtype)
        hz = torch.autograd.grad(g, params, grad_outputs=z, is_grads_batched=True, create_graph=True)
        hz = torch.cat([h.reshape(k, -1) for h in hz], dim=1)
        total = total + (z * hz).sum(dim=0)
        done += k
    return g, total / draws


# ------------------------------------------------------------------------------------------------ Fishr
def per_sample_head_gradients(
    head: nn.Module, features: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = classification_loss
) -> torch.Tensor:
    """``N x P`` gradients of each sample's own loss w.r.t. the head parameters (``torch.func``).

    Equals Fishr's BackPACK ``BatchGrad`` times the batch size. Differentiable w.r.t. features and head.
    """
    from torch.func import functional_call, grad, vmap

    params = dict(head.named_parameters())

    def one(p, h, t):
        return loss_fn(functional_call(head, p, (h.unsqueeze(0),)), t.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, features, y)
    return torch.cat([grads[k].reshape(features.shape[0], -1) for k in params], dim=1)


def gradient_variance(per_sample_grads: torch.Tensor) -> torch.Tensor:
    """Centered variance over samples, per coordinate (Fishr's ``grads_var``)."""
    centered = per_sample_grads - per_sample_grads.mean(dim=0, keepdim=True)
    return centered.pow(2).mean(dim=0)


def fishr_penalty(variances: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fishr (Rame et al. 2022): ``mean_e ||v_e - mean v||^2`` of the per-domain gradient variances."""
    return alignment_penalty(variances)


# ------------------------------------------------------------------------------------------------ CORAL
def coral_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DomainBed's CORAL ``mmd(x, y)``: squared mean difference + squared covariance difference (means)."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cx, cy = x - mean_x, y - mean_y
    cov_x = cx.t() @ cx / (len(x) - 1)
    cov_y = cy.t() @ cy / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


def coral_penalty(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """CORAL (Sun & Saenko 2016) averaged over all pairs of domains, as in DomainBed."""
    n = len(features)
    if n < 2:
        return features[0].new_zeros(())
    total = sum(coral_distance(features[i], features[j]) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)
