"""Run config of ``greg train``: defaults, merging, ``--set``, validation, and building the Method.

Every value of a run enters here once: :func:`load_config` merges the preset files and ``--set`` overrides
onto :data:`DEFAULTS`, :func:`validate` checks types, ranges and cross-field rules, and :func:`make_method`
builds the configured :class:`greg.methods.Method`. The execution plane (``greg.trainer``) takes the result
and checks nothing but what needs the data (dataset sizes).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from greg import data, io, methods, models
from greg.methods.base import ClusterSelection

DEFAULTS: dict[str, Any] = {
    # Seed of everything: data order, augmentation, initialization, method RNGs.
    "seed": 0,
    "model": {
        "name": "small_cnn",  # greg.models registry name
        "kwargs": {},  # extra constructor arguments, e.g. {stem: imagenet} for resnet18
    },
    "init": {
        # Start from weights: a greg run checkpoint (final.pt) or an external file (the shared DenseNets).
        "checkpoint": None,
        "kind": "auto",  # auto | run | pretrained
        # Keep the freshly initialized head (e.g. ImageNet-1k weights into a 10-class DenseNet-121).
        "skip_head": False,
    },
    "data": {
        "root": "data",
        "id": "tiny",  # ID dataset (its train split is trained on)
        "aux": None,  # auxiliary outlier dataset; required by methods with needs_aux
        "batch_size": 64,
        # Auxiliary images per step: an int, or "ratio" = round(n_aux / n_id * batch_size) (GReg+ candidates).
        "aux_batch_size": 128,
        "num_workers": 0,
        "augment": True,  # random crop + flip on ID and auxiliary images, as the official code
    },
    "method": {"name": "ce", "hparams": {}},
    "optim": {
        "name": "sgd",  # sgd | adam
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5.0e-4,
        "betas": [0.9, 0.999],
    },
    "schedule": {
        # cosine: the Energy/GReg LambdaLR multiplier from 1 down to lr_min_ratio over all steps.
        # multistep: multiply by gamma at each epoch in milestones.  constant: no change.
        "name": "cosine",
        "lr_min_ratio": 1.0e-3,
        "milestones": [],
        "gamma": 0.1,
    },
    "train": {
        "epochs": 1,
        "max_steps": None,  # cap on the total number of steps (smoke runs); the schedule spans the cap
        "checkpoint_every": 200,  # steps between resume checkpoints (also at every epoch end)
        "log_every": 1,
        "grad_norm_every": 10,  # steps between logs of the mean input-gradient norm of the score (Fig. 3)
        "grad_norm_score": "energy",
        "progress": True,
    },
}

# init.kind values: how init.checkpoint is read.
INIT_KINDS = {
    "auto": "a greg run checkpoint (final.pt) if the file is one, else external weights",
    "run": "a greg run checkpoint (final.pt); its head is kept when the class count matches",
    "pretrained": "external weights (e.g. the released DenseNets), loaded by greg.models.load_pretrained",
}


class ConfigError(ValueError):
    pass


def deep_merge(base: dict, override: dict, where: str = "") -> dict:
    """Merge ``override`` into a copy of ``base``; keys unknown to ``base`` are errors (typos fail early)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if where in FREE_FORM:  # validated by their owner (the method / the model constructor)
            out[key] = copy.deepcopy(value)
            continue
        if key not in out:
            raise ConfigError(f"unknown config key {path!r}; known here: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and (out[key] or path in FREE_FORM) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value, path)
        elif isinstance(out[key], dict) and not isinstance(value, dict) and value is not None:
            raise ConfigError(f"config key {path!r} must be a mapping, got {type(value).__name__}")
        else:
            _check_type(path, DEFAULTS_TYPES.get(path), value)
            out[key] = value
    return out


def _leaf_types(d: dict, where: str = "") -> dict[str, type]:
    types = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        if isinstance(v, dict) and v:
            types.update(_leaf_types(v, path))
        elif v is not None:
            types[path] = type(v)
    return types


DEFAULTS_TYPES = _leaf_types(DEFAULTS)
# Mappings whose keys belong to someone else: merged key by key, checked by greg.methods / greg.models.
FREE_FORM = {"method.hparams", "model.kwargs"}
_UNION_TYPES = {"data.aux_batch_size": (int, str)}


def _check_type(path: str, expected: type | None, value: Any) -> None:
    if expected is None or value is None:
        return
    allowed = _UNION_TYPES.get(path, (expected,))
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"config key {path!r} must be {'/'.join(t.__name__ for t in allowed)}, got bool")
    if not isinstance(value, allowed):
        raise ConfigError(
            f"config key {path!r} must be {'/'.join(t.__name__ for t in allowed)}, "
            f"got {type(value).__name__} ({value!r})"
        )


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = io.yaml_load(raw)
    return out


def load_yaml_file(path: str | os.PathLike) -> Any:
    """A YAML file parsed with :func:`greg.io.yaml_load`; a missing file or bad YAML is a ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    with open(p, encoding="utf-8") as f:
        try:
            return io.yaml_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e


def load_presets(paths: list[str | os.PathLike]) -> dict:
    """The preset files merged in order (later override earlier), without defaults or validation."""
    cfg: dict = {}
    for p in paths:
        data = load_yaml_file(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a run config must be a mapping, got {type(data).__name__}")
        cfg = _plain_merge(cfg, data)
    return cfg


def _plain_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _plain_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_text(cfg: dict) -> str:
    """The resolved config as stored in a run (config.yaml, checkpoints): resume compares this text."""
    return yaml.safe_dump(cfg, sort_keys=True)


def load_config(paths: list[str | os.PathLike], sets: list[str] | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    for p in paths:
        data = load_yaml_file(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a run config must be a mapping, got {type(data).__name__}")
        try:
            cfg = deep_merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    if sets:
        cfg = deep_merge(cfg, parse_set(sets))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:

    if cfg["model"]["name"] not in models.MODELS:
        raise ConfigError(
            f"model.name: unknown model {cfg['model']['name']!r}; known: {models.MODELS.names()}"
        )
    for key in ("id", "aux"):
        name = cfg["data"][key]
        if name is not None and name not in data.DATASETS:
            raise ConfigError(f"data.{key}: unknown dataset {name!r}; known: {data.DATASETS.names()}")
    if cfg["init"]["kind"] not in INIT_KINDS:
        raise ConfigError(f"init.kind must be one of {', '.join(INIT_KINDS)}, got {cfg['init']['kind']!r}")
    if cfg["optim"]["name"] not in ("sgd", "adam"):
        raise ConfigError(f"optim.name must be sgd or adam, got {cfg['optim']['name']!r}")
    if cfg["schedule"]["name"] not in ("cosine", "multistep", "constant"):
        raise ConfigError(
            f"schedule.name must be cosine, multistep or constant, got {cfg['schedule']['name']!r}"
        )
    abs_ = cfg["data"]["aux_batch_size"]
    if isinstance(abs_, str) and abs_ != "ratio":
        raise ConfigError(f"data.aux_batch_size must be an integer or 'ratio', got {abs_!r}")
    for key in ("batch_size",):
        if cfg["data"][key] <= 0:
            raise ConfigError(f"data.{key} must be positive, got {cfg['data'][key]}")
    if cfg["train"]["epochs"] < 0 or (cfg["train"]["max_steps"] or 0) < 0:
        raise ConfigError("train.epochs and train.max_steps must be >= 0")
    if cfg["train"]["epochs"] == 0 and not cfg["train"]["max_steps"] and not cfg["init"]["checkpoint"]:
        # 0 steps only makes sense to import external weights as a run checkpoint (final.pt).
        raise ConfigError("train.epochs must be positive (0 is allowed only with init.checkpoint)")
    try:
        method = make_method(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"method: {e}") from None
    if isinstance(method, ClusterSelection):
        try:
            method.check_selection()
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None
    if method.needs_aux and cfg["data"]["aux"] is None:
        raise ConfigError(f"method {cfg['method']['name']!r} needs auxiliary data: set data.aux")


def make_method(cfg: dict):
    """The configured method; a method with a ``seed`` hparam left unset gets one derived from the run seed."""

    name, hparams = cfg["method"]["name"], dict(cfg["method"]["hparams"])
    if "seed" in methods.METHODS.get(name).defaults and "seed" not in hparams:
        hparams["seed"] = mix(cfg["seed"], 3) % 2**31
    return methods.create(name, **hparams)


def mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (no Python hash randomization)."""
    return int(
        np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(2, np.uint64)[0] >> 1
    )
