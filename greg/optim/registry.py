"""Optimizers and learning-rate schedules of ``greg train``, by the names of the run config's ``optim.name``
and ``schedule.name``. The config checks a name against these registries and the trainer builds from them:
a new optimizer or schedule is one registered function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from greg.registry import Registry

# name -> f(params, optim section) -> optimizer
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
# name -> f(step, total_steps, steps_per_epoch, schedule section) -> learning-rate multiplier
SCHEDULES: Registry[float] = Registry("schedule")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.Tensor], optim: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=optim["lr"],
        momentum=optim["momentum"],
        nesterov=optim["nesterov"] and optim["momentum"] > 0,
        weight_decay=optim["weight_decay"],
    )


@OPTIMIZERS.register("adam")
def adam(params: Iterable[torch.Tensor], optim: dict) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=optim["lr"], betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"])


@SCHEDULES.register("constant")
def constant(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    return 1.0


@SCHEDULES.register("cosine")
def cosine(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    # Energy-OOD's cosine_annealing(step, total, 1, lr_min_ratio) inside a LambdaLR.
    lo = sched["lr_min_ratio"]
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(step / total_steps * math.pi))


@SCHEDULES.register("multistep")
def multistep(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    epoch = step // steps_per_epoch
    return sched["gamma"] ** sum(epoch >= m for m in sched["milestones"])


def make_optimizer(params: Iterable[torch.Tensor], optim: dict) -> torch.optim.Optimizer:
    """The optimizer ``optim["name"]`` over ``params`` (an unknown name is a ``KeyError`` naming the known)."""
    return OPTIMIZERS.get(optim["name"])(params, optim)


def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    """Learning-rate multiplier at ``step`` (0-based), a pure function so resume needs no scheduler state."""
    fn: Callable[..., float] = SCHEDULES.get(sched["name"])
    return fn(step, total_steps, steps_per_epoch, sched)
