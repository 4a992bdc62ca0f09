"""The ``Method`` base class: a training objective the method-agnostic trainer calls once per step."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from greg.errors import did_you_mean
from greg.sampling import ClusterSampler

Batch = dict[str, torch.Tensor]


class Method:
    """A training objective. Subclasses set the class attributes and implement :meth:`compute_loss`.

    - ``name``: the method's registry key (set by ``METHODS.register``).
    - ``defaults``: every hparam with its default; :meth:`__init__` merges, rejects unknown keys and checks
      each value's type: that of its default (an int default takes integers, a float one any finite
      number, ...), or the types in ``hparam_types`` (inherited and extended along the class hierarchy)
      for an hparam that takes more than one (``None`` among them for "unset"). Ranges are checked in
      :meth:`validate`.
    - ``needs_aux``: the trainer must put auxiliary outliers in ``batch["x_aux"]``.
    - ``extra_classes``: classes the network needs beyond the ID ones (1 for (K+1)-class methods).
    - ``detector``: the detector that evaluates models trained with this method.

    The trainer calls, in order: :meth:`setup` once before step 0 of a fresh run (a resumed run restores
    what it fitted with :meth:`load_state_dict` instead), :meth:`on_epoch_start` before each epoch and
    :meth:`train_step` once per step; :meth:`state_dict` is checkpointed with the run.
    ``compute_loss(model, batch)`` gets ``batch = {"x_id", "y_id", "x_aux" (optional)}`` with the model in
    train mode and returns ``{"total": differentiable loss, <term>: detached value, ...}``; the default
    :meth:`train_step` does ``zero_grad``, ``backward`` of ``total`` and ``optimizer.step()``. A method with
    its own update rule (SAM: two forward/backward passes) overrides :meth:`train_step`.
    """

    name: ClassVar[str] = "method"
    defaults: ClassVar[dict[str, Any]] = {}
    hparam_types: ClassVar[dict[str, tuple[type | None, ...]]] = {}
    needs_aux: ClassVar[bool] = False
    extra_classes: ClassVar[int] = 0
    detector: ClassVar[str] = "msp"

    def __init__(self, **hparams: Any):
        self.hparams: dict[str, Any] = self.resolve_hparams(hparams)
        self.validate()
        # A method with a ``seed`` hparam draws from its own CPU generator, checkpointed with the run so a
        # resumed run draws the same numbers (the trainer derives the seed from the run seed if unset).
        self.generator: torch.Generator | None = None
        if "seed" in self.hparams:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(int(self.hparams["seed"]))

    @classmethod
    def resolve_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` updated with ``hparams``; an unknown key or a value of the wrong type raises
        ``ValueError`` naming the hparam and what it takes."""
        unknown = sorted(set(hparams) - set(cls.defaults))
        if unknown:
            hints = [f"{key!r}{did_you_mean(key, cls.defaults)}" for key in unknown]
            raise ValueError(
                f"method {cls.name!r}: unknown hparam(s) {', '.join(hints)}. "
                f"Known: {', '.join(sorted(cls.defaults)) or '(none)'}"
            )
        for key, value in hparams.items():
            allowed = cls.types_of(key)
            if allowed and not any(_is_type(value, t) for t in allowed):
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                raise ValueError(
                    f"method {cls.name!r}: hparam {key!r} must be {' or '.join(_TYPE_TEXT[t] for t in allowed)}, "
                    f"got {'null' if value is None else f'{type(value).__name__} ({shown})'}"
                )
        return {**cls.defaults, **hparams}

    @classmethod
    def types_of(cls, key: str) -> tuple[type | None, ...]:
        """The types hparam ``key`` takes (empty: any; its default is None and nothing is declared)."""
        for klass in cls.__mro__:
            declared = vars(klass).get("hparam_types") or {}
            if key in declared:
                return declared[key]
        default = cls.defaults.get(key)
        return () if default is None else (float if type(default) is float else type(default),)

    def validate(self) -> None:
        """Check hparam values; subclasses raise ``ValueError`` with the key and what was expected."""

    def compute_loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(
        self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer
    ) -> dict[str, torch.Tensor]:
        """One whole update; returns the terms of :meth:`compute_loss` (``"total"`` included). A non-finite
        total is returned without an update (the trainer stops the run on it, keeping the last good weights).
        """
        terms = self.compute_loss(model, batch)
        total = terms["total"]
        if torch.isfinite(total):
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        return terms

    def setup(
        self,
        model: nn.Module,
        id_data: Dataset,
        aux_data: Dataset | None,
        device: torch.device | str,
        seed: int,
        *,
        from_scratch: bool = False,
    ) -> str | None:
        """Fit what the method needs from the starting ``model`` before step 0 of a fresh run (no-op by
        default). ``id_data`` / ``aux_data``: the run's ID training set and auxiliary set (None when the
        method needs none) with the eval transform; ``seed`` is the method's own; ``from_scratch``: the
        model has random weights (no ``init.checkpoint``). What it fits belongs in :meth:`state_dict`, so a
        resumed run gets it back without refitting, and in :meth:`setup_record`. Returns a line for the
        run's log (None: nothing to say); ``ValueError`` if the run cannot be set up (a config error)."""
        return None

    def setup_record(self) -> dict[str, Any] | None:
        """What :meth:`setup` fitted, as plain values for the final checkpoint's meta (None: nothing)."""
        return None

    def aux_needed(self) -> int:
        """Fewest auxiliary candidates per step the method can work with (methods that select
        ``n_selected`` of them need at least that many); the trainer checks it before training."""
        return int(self.hparams.get("n_selected", 1)) if self.needs_aux else 0

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = sorted(self.state_dict())
        if sorted(state) != expected:
            if not expected:
                raise ValueError(f"method {self.name!r} has no state, got keys {sorted(state)}")
            raise ValueError(f"method {self.name!r}: expected state keys {expected}, got {sorted(state)}")
        if self.generator is not None:
            self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Hook called by the trainer before each epoch; no-op by default."""

    def _require_aux(self, batch: Batch) -> torch.Tensor:
        x_aux = batch.get("x_aux")
        if x_aux is None or len(x_aux) == 0:
            raise ValueError(
                f"method {self.name!r} needs auxiliary outliers: batch['x_aux'] is missing or empty "
                "(set data.aux in the run config)"
            )
        return x_aux

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"


_TYPE_TEXT: dict[type | None, str] = {
    None: "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
    list: "a list", dict: "a mapping",
}


def _is_type(value: Any, t: type | None) -> bool:
    """``value`` of hparam type ``t``: a float hparam takes any finite number, an int one integers only (no
    bool anywhere but where a bool is expected)."""
    if t is None:
        return value is None
    if isinstance(value, bool):
        return t is bool
    if t is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, t)


class ClusterSelection(Method):
    """Base of the methods that pick auxiliary samples per step with ``greg.sampling.ClusterSampler``
    (GReg+: lowest and highest energy per cluster; DOS: lowest absent-class probability per cluster).

    What a subclass must provide (checked when the class is defined): ``selection_score`` (a
    ``greg.scores`` name) and the hparams in :attr:`REQUIRED_HPARAMS` (``n_clusters`` None = a random
    choice, no clustering), optionally ``two_way`` and ``per_cluster`` (None = the released rule, see
    ``greg.sampling.select_from_clusters``); the sampler draws from the method's ``generator``, so
    ``seed`` is required too. Put it first among the bases (``class GRegPlus(ClusterSelection, GReg)``).
    """

    REQUIRED_HPARAMS: ClassVar[tuple[str, ...]] = (
        "n_clusters",
        "n_selected",
        "kmeans_backend",
        "kmeans_kwargs",
        "seed",
    )
    hparam_types: ClassVar[dict[str, tuple[type | None, ...]]] = {
        "n_clusters": (int, None),
        "per_cluster": (int, None),
        "kmeans_kwargs": (dict, None),
    }
    needs_aux: ClassVar[bool] = True
    selection_score: ClassVar[str] = "energy"
    _sampler: Any = None
    last_selected: torch.Tensor | None = None  # indices into the last step's candidates

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [k for k in cls.REQUIRED_HPARAMS if k not in cls.defaults]
        if missing:
            raise TypeError(f"{cls.__name__}: a ClusterSelection method needs the hparams {missing}")

    def kmeans_kwargs(self) -> dict[str, Any]:
        return dict(self.hparams["kmeans_kwargs"] or {})

    def make_sampler(self) -> Any:
        hp = self.hparams
        per_cluster = hp.get("per_cluster")
        return ClusterSampler(
            None if hp["n_clusters"] is None else int(hp["n_clusters"]),
            int(hp["n_selected"]),
            backend=hp["kmeans_backend"],
            two_way=bool(hp.get("two_way", False)),
            score=self.selection_score,
            kmeans_kwargs=self.kmeans_kwargs(),
            per_cluster=None if per_cluster is None else int(per_cluster),
            window=self.candidate_window(),
        )

    def candidate_window(self) -> tuple[int, int | None] | None:
        """Score ranks ``(start, end)`` the sampler draws from (``ClusterSampler``'s ``window``); None: all."""
        return None

    def check_selection(self) -> None:
        """Raise ``ValueError`` if the hparams make an impossible sampler (e.g. GReg+'s ``2 * n_clusters >
        n_selected``); called when the run config is validated, so it fails before step 0. The rule lives
        in the sampler's constructor, which is cheap (k-means runs on ``select``)."""
        self.make_sampler()

    @property
    def sampler(self) -> Any:
        """Built on first use (k-means state belongs to the run, not to the config check)."""
        if self._sampler is None:
            self._sampler = self.make_sampler()
        return self._sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self._sampler = value

    def select(self, model: nn.Module, x_candidates: torch.Tensor) -> torch.Tensor:
        idx = self.sampler.select(model, x_candidates, self.generator)
        idx = torch.as_tensor(idx, dtype=torch.long).to(x_candidates.device)
        self.last_selected = idx
        return idx
