"""Run config of ``greg train``: defaults, merging, ``--set``, validation, and building the Method.

Every value of a run enters here once: :func:`load_config` merges the preset files and ``--set`` overrides
onto :data:`DEFAULTS`, :func:`validate` checks types, ranges and cross-field rules, and :func:`make_method`
builds the configured :class:`greg.methods.Method`. The execution plane (``greg.trainer``) takes the result
and checks nothing but what needs the data (dataset sizes).

One cohesive thing (the run-config schema, its loading and its checks), hence over ~400 lines.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import math
import os
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from greg import data, io, methods, models, scores
from greg.methods.base import ClusterSelection
from greg.optim.registry import OPTIMIZERS, SCHEDULES

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
        # Auxiliary images per step: an int, or "ratio" = floor(pool / n_id * batch_size) (GReg+ candidates;
        # pool = aux_pool_per_epoch or the whole aux set; o4lc/Greg-OOD train_sea.py@4761101:240).
        "aux_batch_size": 128,
        # Each epoch draws this many random auxiliary images (seeded) and the steps walk through them; null =
        # the whole set. Capped at the set's size (greg.stream.aux_pool_size).
        "aux_pool_per_epoch": None,
        "num_workers": 0,
        "augment": True,  # random crop + flip on ID and auxiliary images, as the official code
    },
    "method": {"name": "ce", "hparams": {}},
    "optim": {
        "name": "sgd",  # greg.optim.registry.OPTIMIZERS
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5.0e-4,
        "betas": [0.9, 0.999],
    },
    "schedule": {
        # cosine: the Energy/GReg LambdaLR multiplier from 1 down to lr_min_ratio over all steps.
        # multistep: multiply by gamma at each epoch in milestones.  constant: no change.
        "name": "cosine",  # greg.optim.registry.SCHEDULES
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

# Keys that say how a run is executed, not what it computes (a resumed or rerun run may change them freely):
# they are left out of a run's identity (the workflow's rule params, the run's config hash) and reach
# `greg train` as runtime flags (--workers, --data-root) or late --set overrides. Checkpoint and log cadence
# do not change the weights (resume is bit-identical).
RUNTIME_KEYS = ("data.num_workers", "data.root", "train.progress", "train.checkpoint_every", "train.log_every")

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
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} was set to a value above")
        try:
            node[parts[-1]] = io.yaml_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML ({yaml_error_text(e)})") from None
    return out


def yaml_error_text(e: yaml.YAMLError) -> str:
    """One line of a PyYAML error (its own text spans several lines with a source excerpt)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    return f"{problem}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def load_yaml_file(path: str | os.PathLike) -> Any:
    """A YAML file parsed with :func:`greg.io.yaml_load`; a missing file or bad YAML is a ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    with open(p, encoding="utf-8") as f:
        try:
            return io.yaml_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {yaml_error_text(e)}") from None


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


def science_config(cfg: dict) -> dict:
    """``cfg`` without :data:`RUNTIME_KEYS`: what a run computes, its identity."""
    out = copy.deepcopy(cfg)
    for key in RUNTIME_KEYS:
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def config_hash(cfg: dict) -> str:
    """sha256 of the scientific config (:func:`science_config`), as stored in a run's checkpoints."""
    return hashlib.sha256(config_text(science_config(cfg)).encode("utf-8")).hexdigest()


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose scientific values differ between two configs (sorted)."""
    a, b = _flat(science_config(old)), _flat(science_config(new))
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


_ABSENT = object()


def _flat(d: Any, where: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or (not d and where):
        return {where: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{where}.{k}" if where else str(k)))
    return out


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


# Every leaf of the run config: (allowed types, None allowed, range check or None, what is expected).
_Check = tuple[tuple[type, ...], bool, Any, str]
_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
SCHEMA: dict[str, _Check] = {
    "seed": (_INT, False, lambda v: v >= 0, "an integer >= 0"),
    "model.name": (_STR, False, None, "a model name"),
    "model.kwargs": ((dict,), False, None, "a mapping"),
    "init.checkpoint": (_STR, True, lambda v: v != "", "a file path, a released checkpoint name or null"),
    "init.kind": (_STR, False, lambda v: v in INIT_KINDS, f"one of {', '.join(INIT_KINDS)}"),
    "init.skip_head": (_BOOL, False, None, "true or false"),
    "data.root": (_STR, False, lambda v: v != "", "a directory path"),
    "data.id": (_STR, False, None, "a dataset name"),
    "data.aux": (_STR, True, None, "a dataset name or null"),
    "data.batch_size": (_INT, False, lambda v: v > 0, "an integer > 0"),
    "data.aux_batch_size": ((int, str), False, lambda v: v == "ratio" if isinstance(v, str) else v > 0,
                            "an integer > 0 or 'ratio'"),
    "data.aux_pool_per_epoch": (_INT, True, lambda v: v > 0, "an integer > 0 or null"),
    "data.num_workers": (_INT, False, lambda v: v >= 0, "an integer >= 0"),
    "data.augment": (_BOOL, False, None, "true or false"),
    "method.name": (_STR, False, None, "a method name"),
    "method.hparams": ((dict,), False, None, "a mapping"),
    "optim.name": (_STR, False, lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS.names())}"),
    "optim.lr": (_NUM, False, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "optim.momentum": (_NUM, False, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.nesterov": (_BOOL, False, None, "true or false"),
    "optim.weight_decay": (_NUM, False, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "optim.betas": ((list,), False,
                    lambda v: len(v) == 2 and all(_is(x, _NUM) and 0 <= x < 1 for x in v),
                    "a list of two numbers in [0, 1)"),
    "schedule.name": (_STR, False, lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES.names())}"),
    "schedule.lr_min_ratio": (_NUM, False, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "schedule.milestones": ((list,), False, lambda v: all(_is(x, _INT) and x >= 0 for x in v),
                            "a list of epoch numbers (integers >= 0)"),
    "schedule.gamma": (_NUM, False, lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "train.epochs": (_INT, False, lambda v: v >= 0, "an integer >= 0"),
    "train.max_steps": (_INT, True, lambda v: v >= 0, "an integer >= 0 or null"),
    "train.checkpoint_every": (_INT, False, lambda v: v >= 1, "an integer >= 1 (steps)"),
    "train.log_every": (_INT, False, lambda v: v >= 0, "an integer >= 0 (0 = no per-step log)"),
    "train.grad_norm_every": (_INT, False, lambda v: v >= 0, "an integer >= 0 (0 = never)"),
    "train.grad_norm_score": (_STR, False, None, "a score name"),
    "train.progress": (_BOOL, False, None, "true or false"),
}


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _leaves(d: dict, where: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else str(k)
        if path in SCHEMA or path in FREE_FORM or not isinstance(v, dict):
            out[path] = v
        else:
            out.update(_leaves(v, path))
    return out


def did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_leaves(cfg: dict) -> None:
    """Type and range of every leaf against :data:`SCHEMA`; a missing section (``train: null``) too."""
    for section, default in DEFAULTS.items():
        if isinstance(default, dict) and not isinstance(cfg.get(section), dict):
            raise ConfigError(f"config key {section!r} must be a mapping, got {_show(cfg.get(section))}")
    leaves = _leaves(cfg)
    for path, (types, nullable, ok, expected) in SCHEMA.items():
        if path not in leaves:
            raise ConfigError(f"config key {path!r} is missing")
        v = leaves[path]
        if v is None and nullable:
            continue
        if v is None or not _is(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"config key {path!r} must be {expected}, got {_show(v)}")
        if ok is not None and not ok(v):
            raise ConfigError(f"config key {path!r} must be {expected}, got {v!r}")
    unknown = sorted(set(leaves) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}{did_you_mean(unknown[0], SCHEMA)}")


def _show(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} ({v!r})"


def _accepted_kwargs(fn: Any) -> tuple[set[str], bool]:
    """Keyword names ``fn`` takes, following a ``**kwargs`` factory to the class it returns; the flag says
    whether any name is accepted (an open ``**kwargs`` we cannot follow)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(), True
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return names, False
    try:
        ret = typing.get_type_hints(fn).get("return")
    except (NameError, TypeError, AttributeError):  # unresolvable annotation: cannot tell
        ret = None
    if isinstance(ret, type) and ret is not type(None):
        more, open_ = _accepted_kwargs(ret.__init__)
        return names | more - {"self"}, open_
    return names, True


def check_kwargs(kwargs: dict, fn: Any, what: str, exclude: tuple[str, ...] = ()) -> None:
    """Unknown keyword arguments of ``fn`` -> ``ConfigError`` with a did-you-mean."""
    known, open_ = _accepted_kwargs(fn)
    known -= set(exclude)
    if open_:
        return
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"{what}: unknown argument {key!r}{did_you_mean(key, known)}; "
                              f"known: {', '.join(sorted(known)) or 'none'}")


def validate(cfg: dict) -> None:
    check_leaves(cfg)
    if cfg["model"]["name"] not in models.MODELS:
        raise ConfigError(
            f"model.name: unknown model {cfg['model']['name']!r}; known: {models.MODELS.names()}"
        )
    check_kwargs(cfg["model"]["kwargs"], models.MODELS.get(cfg["model"]["name"]), "model.kwargs",
                 exclude=("num_classes",))
    for key in ("id", "aux"):
        name = cfg["data"][key]
        if name is not None and name not in data.DATASETS:
            raise ConfigError(f"data.{key}: unknown dataset {name!r}; known: {data.DATASETS.names()}")
    if cfg["train"]["grad_norm_every"] and cfg["train"]["grad_norm_score"] not in scores.SCORES:
        raise ConfigError(f"train.grad_norm_score: unknown score {cfg['train']['grad_norm_score']!r}; "
                          f"known: {', '.join(scores.SCORES.names())}")
    if cfg["train"]["epochs"] == 0 and not cfg["train"]["max_steps"] and not cfg["init"]["checkpoint"]:
        # 0 steps only makes sense to import external weights as a run checkpoint (final.pt).
        raise ConfigError("train.epochs must be positive (0 is allowed only with init.checkpoint)")
    try:
        method = make_method(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"method: {e}") from None
    if isinstance(method, ClusterSelection):
        kw = method.hparams.get("kmeans_kwargs")
        if kw is not None and not isinstance(kw, dict):
            raise ConfigError(f"method.hparams.kmeans_kwargs must be a mapping or null, got {_show(kw)}")
        if kw:
            _check_kmeans_kwargs(kw, method.hparams["kmeans_backend"])
        try:
            method.check_selection()
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None
    if method.needs_aux and cfg["data"]["aux"] is None:
        raise ConfigError(f"method {cfg['method']['name']!r} needs auxiliary data: set data.aux")


def _check_kmeans_kwargs(kw: dict, backend: str) -> None:
    from greg.sampling.clustering import KMEANS

    try:
        fn = KMEANS.get(backend)
    except KeyError as e:
        raise ConfigError(f"method.hparams.kmeans_backend: {e.args[0]}") from None
    known, open_ = _accepted_kwargs(fn)
    if open_ and backend == "sklearn":  # the rest goes to sklearn.cluster.KMeans
        from sklearn.cluster import KMeans

        known |= set(inspect.signature(KMeans).parameters)
        open_ = False
    known -= {"x", "k", "seed", "n_clusters", "random_state"}  # set by the sampler
    if open_:
        return
    for key in kw:
        if key not in known:
            raise ConfigError(f"method.hparams.kmeans_kwargs: unknown argument {key!r} of the {backend} "
                              f"backend{did_you_mean(key, known)}; known: {', '.join(sorted(known))}")


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
