"""Pseudo-OOD images made from ID images, for SAM fine-tuning (``greg.methods.sam_finetune``).

The SAM appendix shows pseudo-OOD examples made from ImageNet-1K and CIFAR-10 images but does not specify the
generator; these transforms are our documented choices. Each is a pure function ``f(x, generator, **kw)`` of a
batch ``x`` (``B x C x H x W``, already normalized) and a ``torch.Generator``: the same inputs and generator
state give the same output, and nothing reads the global RNG. Registry: :data:`PSEUDO_OOD`; build one with
:func:`make` (validates the keyword arguments).

- ``patch_shuffle`` (default): cut each image into a ``grid x grid`` array of patches and permute them (one
  random permutation per image, never the identity). Keeps local texture and colour statistics, destroys the
  global shape: "near" OOD.
- ``blur_noise``: heavy Gaussian blur (``sigma = sigma_frac * min(H, W)``) plus Gaussian noise of std
  ``noise_std`` (in normalized units). Keeps the coarse colour layout, destroys detail.
- ``pixel_permute``: permute the pixel positions of each image (one permutation for all channels). Keeps the
  colour histogram only: "far" OOD.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from greg.registry import Registry

PseudoOOD = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PSEUDO_OOD: Registry[torch.Tensor] = Registry("pseudo-OOD transform")


def _check_images(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pseudo-OOD {name!r} expects a B x C x H x W batch, got shape {tuple(x.shape)}")


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniforms drawn on the generator's device, moved to ``like``'s device (a CPU generator on GPU)."""
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def _randperms(b: int, n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``b`` independent uniform permutations of ``range(n)`` (argsort of uniforms), ``b x n`` long."""
    return torch.argsort(_rand((b, n), generator, like), dim=1)


@PSEUDO_OOD.register("patch_shuffle")
def patch_shuffle(x: torch.Tensor, generator: torch.Generator, grid: int = 4) -> torch.Tensor:
    """Permute the ``grid x grid`` patches of each image (independent permutation per image).

    ``H`` and ``W`` must be divisible by ``grid``. A drawn identity permutation is replaced by its cyclic
    shift by one, so no image is returned unchanged (matters for small grids: 1/24 of draws at grid 2).
    """
    _check_images("patch_shuffle", x)
    b, c, h, w = x.shape
    if grid < 2 or h % grid or w % grid:
        raise ValueError(f"pseudo-OOD 'patch_shuffle': grid={grid} must be >= 2 and divide H={h} and W={w}")
    n, ph, pw = grid * grid, h // grid, w // grid
    perm = _randperms(b, n, generator, x)
    ident = torch.arange(n, device=x.device)
    is_id = (perm == ident).all(dim=1)
    perm[is_id] = torch.roll(ident, 1)
    patches = x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, ph, pw)
    patches = patches[torch.arange(b, device=x.device)[:, None], perm]
    return patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalized Gaussian taps at ``-r..r`` with radius ``r = ceil(3 sigma)``."""
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (scipy's ``mode="mirror"``); the radius is capped at
    ``min(H, W) - 1`` because reflect padding cannot exceed the image."""
    _, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, x.dtype, x.device)
    r = (len(k) - 1) // 2
    cap = min(h, w) - 1
    if r > cap:
        k = k[r - cap : r + cap + 1]
        k = k / k.sum()
        r = cap
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@PSEUDO_OOD.register("blur_noise")
def blur_noise(
    x: torch.Tensor, generator: torch.Generator, sigma_frac: float = 0.1, noise_std: float = 0.5
) -> torch.Tensor:
    """``blur_sigma(x) + noise_std * N(0, 1)``, ``sigma = sigma_frac * min(H, W)`` pixels (3.2 at 32x32)."""
    _check_images("blur_noise", x)
    if sigma_frac <= 0 or noise_std < 0:
        raise ValueError(
            f"pseudo-OOD 'blur_noise': need sigma_frac > 0 and noise_std >= 0, got {sigma_frac}, {noise_std}"
        )
    y = gaussian_blur(x, sigma_frac * min(x.shape[-2:]))
    if noise_std > 0:
        noise = torch.randn(tuple(x.shape), generator=generator, device=generator.device)
        y = y + noise_std * noise.to(device=x.device, dtype=x.dtype)
    return y


@PSEUDO_OOD.register("pixel_permute")
def pixel_permute(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Permute the ``H * W`` pixel positions of each image (same permutation across its channels)."""
    _check_images("pixel_permute", x)
    b, c, h, w = x.shape
    perm = _randperms(b, h * w, generator, x)
    flat = x.reshape(b, c, h * w)
    return torch.gather(flat, 2, perm[:, None, :].expand(b, c, h * w)).reshape(b, c, h, w)


def make(name: str, **kwargs: Any) -> PseudoOOD:
    """The transform ``name`` with its keyword arguments bound; unknown keys raise ``ValueError``."""
    fn = PSEUDO_OOD.get(name)
    allowed = [p for p in list(inspect.signature(fn).parameters)[2:]]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"pseudo-OOD {name!r}: unknown argument(s) {unknown}; known: {allowed or '(none)'}")
    return partial(fn, **kwargs)


def names() -> list[str]:
    return PSEUDO_OOD.names()
