"""POEM (Ming, Fan & Li, "POEM: Out-of-distribution Detection with Posterior Sampling", ICML 2022).

Boundary-outlier mining with a Bayesian linear regression (BLR) head on the penultimate features and
Thompson sampling; the network is trained with the energy loss on the mined outliers.

Facts from the released code (github.com/deeplearning-wisc/poem, ``neural_linear_opt.py`` / ``train_poem.py``):

- one BLR output (ID vs. OOD) on the raw penultimate features ``z`` (no bias): targets ``-conf`` for ID
  rows and ``+conf`` for OOD rows, ``conf = 3``;
- prior ``w ~ N(0, sigma I)``, ``sigma = 20``; noise variance ``sigma_n = 0.5``;
  posterior ``A = Z^T Z / sigma_n + I / sigma``, ``mu = A^-1 Z^T y / sigma_n`` and covariance
  ``sigma * A^-1`` (the code scales ``A^-1`` by the *prior* variance; exact BLR would use ``A^-1``);
  before the first update ``mu ~ N(0, 0.01^2)`` per coordinate and covariance ``sigma I``;
- Thompson sampling: one ``w ~ N(mu, cov)`` per posterior update; a candidate's score is ``|w^T z|`` and the
  candidates with the *smallest* score (closest to the sampled ID/OOD boundary) are kept;
- the posterior is refit once per epoch, in eval mode, on the ID training set and the outliers selected
  in the last ``BUF_SIZE = 4`` epochs (balanced ID/OOD);
- loss ``CE(ID) + 0.1 * (mean relu(S_id - m_in)^2 + mean relu(m_out - S_ood)^2)``, ``m_in = -25``,
  ``m_out = -7`` (the Energy loss; one forward of ``[x_id; x_ood]``);
- per epoch, 400,000 candidates (200 x 2,000) are scored and 50,000 (one per ID training image) selected:
  one outlier in 8. Training batch: 64 ID + 64 selected outliers.

Our implementation (documented simplifications, docs/BASELINES.md):

- mining is per step over the trainer's candidate batch ``batch["x_aux"]``: keep the ``n_selected`` lowest
  ``|w^T z|`` (the official ratio 1:8 is ``aux_batch_size = 8 * n_selected``);
- the refit + new Thompson sample happens every ``update_every`` steps, or at each epoch start with
  ``update_every = "epoch"`` (the official frequency);
- the posterior uses the rows of the last ``buffer_updates`` update periods (official: 4 epochs), each
  step's ID batch (target ``-conf``) and mined outliers (``+conf``), balanced as in the official code. Their
  features are recorded (eval mode, no grad) when the samples are seen and kept only as the sufficient
  statistics ``Z^T Z`` and ``Z^T y`` per period (constant memory, exact resume), instead of re-embedding
  the images of the window with the current network at every refit; and the ID rows are the ID batches
  seen in the window rather than the whole ID training set;
- the official code adds one scalar ``N(0, sigma_n)`` draw to every regression target; we use the plain
  ``+-conf`` targets.

"POEM + Grad" (GReg paper Table 4) is ``lambda_grad > 0`` (``greg.methods.grad_reg``, the energy score with
margins ``m_in`` / ``m_out``), inherited from :class:`~greg.methods.energy.EnergyLoss`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from greg.device import eval_mode
from greg.methods._registry import METHODS
from greg.methods.base import Batch
from greg.methods.energy import EnergyLoss


def blr_posterior_from_stats(
    zz: torch.Tensor, zy: torch.Tensor, prior_var: float, noise_var: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bayesian linear regression ``y = w^T z + eps``, ``w ~ N(0, prior_var I)``, ``eps ~ N(0, noise_var)``,
    from the sufficient statistics ``zz = Z^T Z`` (d x d) and ``zy = Z^T y`` (d).

    Returns ``(mu, chol)`` in float64: the posterior mean ``mu = A^-1 Z^T y / noise_var`` and the lower
    Cholesky factor ``L`` of the precision ``A = Z^T Z / noise_var + I / prior_var`` (``A = L L^T``).
    """
    zz = zz.double()
    d = zz.shape[0]
    a = zz / noise_var + torch.eye(d, dtype=torch.float64, device=zz.device) / prior_var
    chol = torch.linalg.cholesky(a)
    mu = torch.cholesky_solve(zy.double().reshape(-1, 1) / noise_var, chol).squeeze(1)
    return mu, chol


def thompson_sample(
    mu: torch.Tensor, chol: torch.Tensor | None, cov_scale: float, generator: torch.Generator
) -> torch.Tensor:
    """One draw ``w ~ N(mu, cov_scale * A^-1)`` with ``A = chol chol^T`` (``chol = None``: ``A = I``).

    ``w = mu + sqrt(cov_scale) * L^-T eps`` with ``eps ~ N(0, I)`` drawn on the CPU from ``generator``, so
    the draw is the same on every device: ``Cov(L^-T eps) = L^-T L^-1 = A^-1``.
    """
    eps = torch.randn(mu.shape[0], generator=generator, dtype=torch.float64).to(mu.device)
    if chol is not None:
        eps = torch.linalg.solve_triangular(chol.T, eps.unsqueeze(1), upper=True).squeeze(1)
    return mu.double() + float(cov_scale) ** 0.5 * eps


def boundary_select(z: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` rows with the smallest ``|z w|`` (the sampled boundary), ties to the lower index."""
    score = (z.double() @ w.double().to(z.device)).abs()
    return torch.sort(score, stable=True).indices[:n]


class StatsWindow:
    """``Z^T Z`` / ``Z^T y`` / row count of the current period plus the last ``size - 1`` closed periods.

    ``add`` accumulates rows into the current period; ``close`` ends it (dropping the oldest beyond the
    window); ``totals`` sums the window. Everything is float64 on the rows' device.
    """

    def __init__(self, size: int):
        self.size = size
        self.zz: torch.Tensor | None = None  # (m, d, d): closed periods, oldest first, then the current one
        self.zy: torch.Tensor | None = None  # (m, d)
        self.n: list[int] = []

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z, y = z.detach().double(), y.detach().double().to(z.device)
        if self.zz is None:
            d = z.shape[1]
            self.zz = z.new_zeros(1, d, d)
            self.zy = z.new_zeros(1, d)
            self.n = [0]
        self.zz[-1] += z.T @ z
        self.zy[-1] += z.T @ y  # type: ignore[index]
        self.n[-1] += z.shape[0]

    def close(self) -> None:
        """Start a new period, keeping at most ``size`` periods (the new one included)."""
        if self.zz is None:
            return
        keep = self.size - 1
        zz, zy, n = self.zz[-keep:] if keep else self.zz[:0], self.zy[-keep:] if keep else self.zy[:0], self.n
        self.zz = torch.cat([zz, torch.zeros_like(self.zz[:1])])
        self.zy = torch.cat([zy, torch.zeros_like(self.zy[:1])])  # type: ignore[index]
        self.n = (n[-keep:] if keep else []) + [0]

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self.zz is None or sum(self.n) == 0:
            return None
        return self.zz.sum(0), self.zy.sum(0), sum(self.n)  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        return {"zz": self.zz, "zy": self.zy, "n": list(self.n)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["zz"] is not None and state["zz"].shape[0] > self.size:
            raise ValueError(
                f"state holds {state['zz'].shape[0]} periods, more than the window of {self.size}"
            )
        self.zz, self.zy, self.n = state["zz"], state["zy"], [int(v) for v in state["n"]]


@METHODS.register("poem")
class POEM(EnergyLoss):
    """``L = CE(ID) + lambda_S * L_S(x_id, x_aux[sel]) [+ lambda_grad * L_grad]``, ``sel`` = the
    ``n_selected`` candidates closest to the Thompson-sampled BLR boundary (module docstring).

    Hparams (official value in brackets): ``n_selected`` outliers per step [64], ``prior_var`` sigma [20],
    ``noise_var`` sigma_n [0.5], ``conf`` regression target [3], ``cov_scale`` (None = ``prior_var``, the
    official ``sigma * A^-1``; 1.0 = exact BLR), ``init_std`` of the initial mean [0.01],
    ``buffer_updates`` update periods in the posterior window [4], ``update_every`` (steps, or ``"epoch"``
    [official]), ``seed`` of the CPU generator (Thompson draws, initial mean). Energy-loss hparams as
    :class:`EnergyLoss` (``lambda_S = 0.1``, ``m_in = -25``, ``m_out = -7``: POEM's defaults).

    :meth:`state_dict` holds the generator, the sampled weight, the posterior mean, the window statistics
    and the step counter, so a resumed run mines the same outliers.
    """

    defaults: ClassVar[dict[str, Any]] = {
        **EnergyLoss.defaults,
        "n_selected": 64,
        "prior_var": 20.0,
        "noise_var": 0.5,
        "conf": 3.0,
        "cov_scale": None,
        "init_std": 0.01,
        "buffer_updates": 4,
        "update_every": "epoch",
        "forward_batch_size": 1024,
        "seed": 0,
    }
    hparam_types: ClassVar[dict[str, tuple[type | None, ...]]] = {"cov_scale": (float, None), "update_every": (str, int)}

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self.window = StatsWindow(int(self.hparams["buffer_updates"]))
        self.mu: torch.Tensor | None = None
        self.w: torch.Tensor | None = None  # the Thompson-sampled weight used for mining
        self.steps = 0
        self.n_updates = 0
        self.last_selected: torch.Tensor | None = None

    def validate(self) -> None:
        super().validate()
        hp = self.hparams
        for key in ("n_selected", "buffer_updates", "forward_batch_size"):
            if int(hp[key]) < 1:
                raise ValueError(f"method {self.name!r}: {key} must be >= 1, got {hp[key]!r}")
        for key in ("prior_var", "noise_var"):
            if float(hp[key]) <= 0:
                raise ValueError(f"method {self.name!r}: {key} must be > 0, got {hp[key]!r}")
        if hp["cov_scale"] is not None and float(hp["cov_scale"]) < 0:
            raise ValueError(f"method {self.name!r}: cov_scale must be >= 0 or None, got {hp['cov_scale']!r}")
        ue = hp["update_every"]
        if ue != "epoch" and (isinstance(ue, bool) or not isinstance(ue, int) or ue < 1):
            raise ValueError(f"method {self.name!r}: update_every must be 'epoch' or an int >= 1, got {ue!r}")

    @property
    def cov_scale(self) -> float:
        c = self.hparams["cov_scale"]
        return float(self.hparams["prior_var"] if c is None else c)

    # -- posterior ------------------------------------------------------------------------------------

    def _init_posterior(self, d: int, device: torch.device) -> None:
        """Official start: ``mu ~ N(0, init_std^2)``, covariance ``prior_var * I``; one Thompson draw."""
        g = self.generator
        mu = float(self.hparams["init_std"]) * torch.randn(d, generator=g, dtype=torch.float64)
        self.mu = mu.to(device)
        self.w = thompson_sample(self.mu, None, float(self.hparams["prior_var"]), g)

    def update_posterior(self) -> bool:
        """Refit the BLR on the window (ID target ``-conf``, OOD ``+conf``), draw a new ``w`` and start a
        new period. Returns False (nothing done) while no row has been recorded."""
        tot = self.window.totals()
        if tot is None:
            return False
        zz, zy, _ = tot
        self.mu, chol = blr_posterior_from_stats(
            zz, zy, float(self.hparams["prior_var"]), float(self.hparams["noise_var"])
        )
        self.w = thompson_sample(self.mu, chol, self.cov_scale, self.generator)
        self.window.close()
        self.n_updates += 1
        return True

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if self.hparams["update_every"] == "epoch" and epoch > 0:
            self.update_posterior()

    # -- mining ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def eval_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of ``x`` in eval mode (each submodule's flag restored), in chunks."""
        with eval_mode(model):
            chunks = torch.split(x, int(self.hparams["forward_batch_size"]))
            return torch.cat([model.features(c).flatten(1) for c in chunks])

    def mine(self, model: nn.Module, x_id: torch.Tensor, x_cand: torch.Tensor) -> torch.Tensor:
        """Indices of the mined candidates; records the ID rows and the mined rows in the window."""
        n_sel = int(self.hparams["n_selected"])
        if n_sel > len(x_cand):
            raise ValueError(
                f"method {self.name!r}: n_selected={n_sel} but the batch has only {len(x_cand)} candidates "
                "(raise data.aux_batch_size)"
            )
        ue = self.hparams["update_every"]
        if ue != "epoch" and self.steps > 0 and self.steps % int(ue) == 0:
            self.update_posterior()
        h = self.eval_features(model, torch.cat([x_id, x_cand]))
        h_id, h_cand = h[: len(x_id)], h[len(x_id) :]
        if self.w is None:
            self._init_posterior(h.shape[1], h.device)
        idx = boundary_select(h_cand, self.w, n_sel)  # type: ignore[arg-type]
        conf = float(self.hparams["conf"])
        self.window.add(h_id, h_id.new_full((len(h_id),), -conf))
        self.window.add(h_cand[idx], h_cand.new_full((n_sel,), conf))
        self.steps += 1
        idx = idx.to(x_cand.device)
        self.last_selected = idx
        return idx

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x_cand = self._require_aux(batch)
        idx = self.mine(model, batch["x_id"], x_cand)
        out = self.energy_terms(model, batch["x_id"], batch["y_id"], x_cand[idx])
        out["n_aux_selected"] = torch.tensor(float(len(idx)))
        return out

    # -- checkpointing ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),  # the generator (and margins: auto's fitted margins)
            "w": self.w,
            "mu": self.mu,
            "window": self.window.state_dict(),
            "steps": self.steps,
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"method {self.name!r}: expected state keys {sorted(expected)}, got {sorted(state)}")
        try:
            self.window.load_state_dict(state["window"])
        except ValueError as e:
            raise ValueError(f"method {self.name!r}: {e} (buffer_updates={self.window.size})") from None
        super().load_state_dict(state)
        self.w, self.mu = state["w"], state["mu"]
        self.steps, self.n_updates = int(state["steps"]), int(state["n_updates"])
