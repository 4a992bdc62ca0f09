"""Optimizer wrappers: sharpness-aware minimization (``greg.optim.sam``)."""

from greg.optim.sam import SAM, frozen_norm_stats, is_norm_module, norm_parameters

__all__ = ["SAM", "frozen_norm_stats", "is_norm_module", "norm_parameters"]
