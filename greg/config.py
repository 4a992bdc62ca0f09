"""Run config of ``greg train``: its keys, merging, ``--set``, validation, and building the Method.

Every value of a run enters here once. :data:`KEYS` declares each leaf of the run config once (default,
types, range check, what is allowed, help); :data:`DEFAULTS` is derived from it. :func:`load_config`
checks each preset file and the ``--set`` overrides against :data:`KEYS` (:func:`check`, naming the file),
merges them onto the defaults (:func:`merge`), and :func:`validate` checks the whole config and the
cross-field rules. :func:`make_method` builds the configured :class:`greg.methods.Method`, whose hparams
are checked by the method (types from its declarations, ranges in its ``validate``). The execution plane
(``greg.trainer``) takes the result and checks nothing but what needs the data (dataset sizes).

The workflow planner (``greg.plan``) and the CLIs check their values with the same :func:`check_value` /
:func:`check_kwargs`, so a run config, a workflow config and a command-line flag are held to one rule.

One cohesive thing (the run-config schema, its loading and its checks), hence over ~400 lines.
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import hashlib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from greg import data, io, methods, models, scores
from greg.errors import cap, did_you_mean
from greg.methods.base import ClusterSelection
from greg.optim.registry import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    pass


# Seeds are mixed through their low 32 bits (:func:`mix`): a larger one would alias a smaller one.
SEED_MAX = 2**32 - 1
# Salts of the seeds derived from the run seed, ``mix(seed, salt)``: one named stream each, so no two
# consumers draw the same numbers. Changing one changes every run's weights.
SALT_MODEL_INIT = 0  # torch's global RNG before the model is built
SALT_ID_STREAM = 1  # order and augmentation of the ID training images (greg.stream.StreamSampler)
SALT_AUX_STREAM = 2  # ... of the auxiliary images
SALT_METHOD = 3  # a method's own generator (its ``seed`` hparam when unset)
SALT_METHOD_SETUP = 4  # the draws of ``Method.setup`` before step 0 (e.g. the ``margins: auto`` fit)

# init.kind values: how init.checkpoint is read.
INIT_KINDS = {
    "auto": "a greg run checkpoint (final.pt) if the file is one, else external weights",
    "run": "a greg run checkpoint (final.pt); its head is kept when the class count matches",
    "pretrained": "external weights (e.g. the released DenseNets), loaded by greg.models.load_pretrained",
}


@dataclass(frozen=True)
class Key:
    """One leaf of the run config: its default, the types it takes, a range check, what is allowed (the
    error text) and what it means."""

    default: Any
    types: tuple[type, ...]
    expected: str
    ok: Callable[[Any], bool] | None = None
    nullable: bool = False
    help: str = ""


_INT, _NUM, _STR, _BOOL, _MAP = (int,), (int, float), (str,), (bool,), (dict,)


def _bool(default: bool, help: str = "") -> Key:
    return Key(default, _BOOL, "true or false", help=help)


def _int(default: int | None, lo: int, help: str = "", nullable: bool = False, hi: int | None = None) -> Key:
    what = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    ok = (lambda v: v >= lo) if hi is None else (lambda v: lo <= v <= hi)
    return Key(default, _INT, what + (" or null" if nullable else ""), ok, nullable, help)


def _positive(default: float, help: str = "") -> Key:
    return Key(default, _NUM, "a number > 0", lambda v: v > 0, help=help)


KEYS: dict[str, Key] = {
    "seed": _int(0, 0, "seed of everything: data order, augmentation, initialization, method RNGs",
                 hi=SEED_MAX),
    "model.name": Key("small_cnn", _STR, f"one of {', '.join(models.MODELS.names())}",
                      lambda v: v in models.MODELS, help="greg.models registry name"),
    "model.kwargs": Key({}, _MAP, "a mapping",
                        help="extra constructor arguments, e.g. {stem: imagenet} for resnet18 (checked "
                             "against the constructor's signature)"),
    "init.checkpoint": Key(None, _STR, "a file path, a released checkpoint name or null", lambda v: v != "",
                           True, "start from weights: a greg run checkpoint (final.pt) or an external file "
                                 "(the shared DenseNets)"),
    "init.kind": Key("auto", _STR, f"one of {', '.join(INIT_KINDS)}", lambda v: v in INIT_KINDS,
                     help="how init.checkpoint is read (INIT_KINDS)"),
    "init.skip_head": _bool(False, "keep the freshly initialized head (e.g. ImageNet-1k weights into a "
                                   "10-class DenseNet-121)"),
    "data.root": Key("data", _STR, "a directory path", lambda v: v != ""),
    "data.id": Key("tiny", _STR, "a dataset name", help="ID dataset (its train split is trained on)"),
    "data.aux": Key(None, _STR, "a dataset name or null", nullable=True,
                    help="auxiliary outlier dataset; required by methods with needs_aux"),
    "data.batch_size": _int(64, 1),
    "data.aux_batch_size": Key(
        128, (int, str), "an integer > 0 or 'ratio'", lambda v: v == "ratio" if isinstance(v, str) else v > 0,
        help="auxiliary images per step: an int, or 'ratio' = floor(pool / n_id * batch_size) (GReg+ "
             "candidates; pool = aux_pool_per_epoch or the whole aux set; o4lc/Greg-OOD "
             "train_sea.py@4761101:240)"),
    "data.aux_pool_per_epoch": _int(None, 1, "each epoch draws this many random auxiliary images (seeded) and "
                                             "the steps walk through them; null = the whole set. Capped at the "
                                             "set's size (greg.stream.aux_pool_size)", nullable=True),
    "data.num_workers": _int(0, 0),
    "data.augment": _bool(True, "random crop + flip on ID and auxiliary images, as the official code"),
    "method.name": Key("ce", _STR, f"one of {', '.join(methods.METHODS.names())}",
                       lambda v: v in methods.METHODS),
    "method.hparams": Key({}, _MAP, "a mapping", help="the method's hparams (checked by the method)"),
    "optim.name": Key("sgd", _STR, f"one of {', '.join(OPTIMIZERS.names())}", lambda v: v in OPTIMIZERS,
                      help="greg.optim.registry.OPTIMIZERS"),
    "optim.lr": _positive(0.1),
    "optim.momentum": Key(0.9, _NUM, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "optim.nesterov": _bool(True),
    "optim.weight_decay": Key(5.0e-4, _NUM, "a number >= 0", lambda v: v >= 0),
    "optim.betas": Key([0.9, 0.999], (list,), "a list of two numbers in [0, 1)",
                       lambda v: len(v) == 2 and all(_is(x, _NUM) and 0 <= x < 1 for x in v)),
    "schedule.name": Key("cosine", _STR, f"one of {', '.join(SCHEDULES.names())}", lambda v: v in SCHEDULES,
                         help="greg.optim.registry.SCHEDULES. cosine: the Energy/GReg LambdaLR multiplier from "
                              "1 down to lr_min_ratio over all steps; multistep: multiply by gamma at each "
                              "epoch in milestones; constant: no change"),
    "schedule.lr_min_ratio": Key(1.0e-3, _NUM, "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "schedule.milestones": Key([], (list,), "a list of epoch numbers (integers >= 0)",
                               lambda v: all(_is(x, _INT) and x >= 0 for x in v)),
    "schedule.gamma": _positive(0.1),
    "train.epochs": _int(1, 0),
    "train.max_steps": _int(None, 1, "cap on the total number of steps (smoke runs); the schedule spans the "
                                     "cap; null = no cap", nullable=True),
    "train.checkpoint_every": _int(200, 1, "steps between resume checkpoints (also at every epoch end)"),
    "train.log_every": _int(1, 0, "steps between per-step log lines (0 = none)"),
    "train.grad_norm_every": _int(10, 0, "steps between logs of the mean input-gradient norm of the score "
                                         "(Fig. 3; 0 = never)"),
    "train.grad_norm_score": Key("energy", _STR, "a score name"),
    "train.progress": _bool(True),
}

# Mappings whose keys belong to someone else: merged key by key, checked by the model constructor's
# signature / the method's hparam declarations.
FREE_FORM = ("method.hparams", "model.kwargs")

# Keys that say how a run is executed, not what it computes (a resumed or rerun run may change them freely):
# they are left out of a run's identity (the workflow's rule params, the run's config hash) and reach
# `greg train` as runtime flags (--workers, --data-root) or late --set overrides. Checkpoint and log cadence
# do not change the weights (resume is bit-identical).
RUNTIME_KEYS = ("data.num_workers", "data.root", "train.progress", "train.checkpoint_every", "train.log_every")


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
    return out


DEFAULTS: dict[str, Any] = _nest({path: k.default for path, k in KEYS.items()})
_SECTIONS = {path.rsplit(".", 1)[0] for path in KEYS if "." in path}


def flatten(d: Any, where: str = "", free_form: bool = False) -> dict[str, Any]:
    """Dotted path -> value of every leaf: a declared key (a free-form mapping whole, or its leaves too with
    ``free_form``), or any non-mapping / empty mapping; unknown mappings are descended into (their leaves
    are then unknown keys)."""
    stop = where in KEYS and not (free_form and where in FREE_FORM)
    if not isinstance(d, dict) or (where and (stop or not d)):
        return {where: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{where}.{k}" if where else str(k), free_form))
    return out


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``override`` merged into a copy of ``base``: mappings key by key (free-form ones one level: their
    values are replaced whole), everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(out.get(key), dict) and isinstance(value, dict) and where not in FREE_FORM:
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check(cfg: dict, partial: bool = False) -> None:
    """Every leaf of ``cfg`` against :data:`KEYS`: unknown keys, types and ranges; with ``partial`` (one
    preset file, the ``--set`` overrides) missing keys are fine."""
    leaves = flatten(cfg)
    for path, v in leaves.items():
        if path in KEYS:
            check_value(f"config key {path!r}", v, KEYS[path])
        elif path in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {_show(v)}")
        else:
            _unknown(path)
    if not partial:
        for path in KEYS:
            if path not in leaves:
                raise ConfigError(f"config key {path!r} is missing")


def _unknown(path: str) -> None:
    parts = path.split(".")
    for i in range(1, len(parts) + 1):  # the first part that is neither a section nor a key
        head = ".".join(parts[:i])
        if head in KEYS:  # a scalar key given as a mapping
            raise ConfigError(f"config key {head!r} must be {KEYS[head].expected}, got a mapping")
        if head not in _SECTIONS:
            break
    parent = ".".join(parts[: i - 1])
    known = sorted({p[len(parent) + 1 if parent else 0 :].split(".")[0] for p in KEYS
                    if not parent or p.startswith(f"{parent}.")})
    raise ConfigError(f"unknown config key {head!r}{did_you_mean(parts[i - 1], known)}; "
                      f"known here: {', '.join(known)}")


def check_value(what: str, v: Any, key: Key) -> None:
    """``v`` against one declaration: ``ConfigError`` "<what> must be <expected>, got ..." otherwise."""
    if v is None and key.nullable:
        return
    if v is None or not _is(v, key.types) or (isinstance(v, float) and not math.isfinite(v)):
        raise ConfigError(f"{what} must be {key.expected}, got {_show(v)}")
    if key.ok is not None and not key.ok(v):
        raise ConfigError(f"{what} must be {key.expected}, got {cap(repr(v), 80)}")


def flag(key: Key) -> Callable[[str], Any]:
    """An argparse ``type`` that reads a command-line value as YAML and checks it with :func:`check_value`
    (the run config's rule): ``--n-ood -5`` is "argument --n-ood: must be an integer >= 0, got '-5'"."""

    def parse(text: str) -> Any:
        try:
            value = io.yaml_load(text)
        except yaml.YAMLError:
            value = text
        try:
            check_value("", value, key)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"must be {key.expected}, got {cap(text, 80)!r}") from None
        return value

    parse.__name__ = key.expected  # argparse names the type in its own messages
    return parse


def int_flag(lo: int, hi: int | None = None, nullable: bool = False) -> Callable[[str], Any]:
    """:func:`flag` of an integer in ``[lo, hi]``."""
    return flag(_int(None, lo, nullable=nullable, hi=hi))


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _show(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} ({cap(repr(v), 80)})"


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` checked (:func:`check`, partial) and merged into a copy of ``base``."""
    check(override, partial=True)
    return merge(base, override)


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
        return cap(" ".join(str(e).split()), 300)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return cap(str(problem), 300) + where


def load_yaml_file(path: str | os.PathLike) -> Any:
    """A YAML file parsed with :func:`greg.io.yaml_load`; a missing, binary or bad-YAML file is a
    ``ConfigError`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            return io.yaml_load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (not UTF-8 at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {yaml_error_text(e)}") from None


def _load_mapping(p: str | os.PathLike) -> dict:
    data = load_yaml_file(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a run config must be a mapping, got {type(data).__name__}")
    return data


def load_presets(paths: list[str | os.PathLike], checked: bool = False) -> dict:
    """The preset files merged in order (later override earlier), without defaults; with ``checked`` each
    file's keys and values are checked first (:func:`check`, the error naming the file)."""
    cfg: dict = {}
    for p in paths:
        data = _load_mapping(p)
        if checked:
            try:
                check(data, partial=True)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
        cfg = merge(cfg, data)
    return cfg


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
    a, b = (flatten(science_config(c), free_form=True) for c in (old, new))
    return sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))


_ABSENT = object()


def load_config(paths: list[str | os.PathLike], sets: list[str] | None = None) -> dict:
    """The run config: each preset file checked (naming it) and merged onto :data:`DEFAULTS` in order,
    then the ``--set`` overrides, then :func:`validate`."""
    cfg = merge(DEFAULTS, load_presets(paths, checked=True))
    if sets:
        override = parse_set(sets)
        check(override, partial=True)
        cfg = merge(cfg, override)
    validate(cfg)
    return cfg


def _accepted_kwargs(fn: Any) -> tuple[dict[str, Any], bool]:
    """Keyword names ``fn`` takes with their annotations, following a ``**kwargs`` factory to the class it
    returns; the flag says whether any name is accepted (an open ``**kwargs`` we cannot follow)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}, True
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except (NameError, TypeError, AttributeError):  # unresolvable annotation: cannot tell
        hints = {}
    names = {n: hints.get(n, Any) for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return names, False
    ret = hints.get("return")
    if isinstance(ret, type) and ret is not type(None):
        more, open_ = _accepted_kwargs(ret)
        return {**more, **names}, open_
    return names, True


def matches(value: Any, ann: Any) -> bool:
    """Whether a config value (YAML: numbers, strings, lists, mappings, null) fits a type annotation;
    an annotation it cannot read (a class, ``Any``) accepts anything."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if ann is None or ann is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return _is(value, _NUM) and math.isfinite(value)
    if ann is str:
        return isinstance(value, str)
    if origin is tuple or ann is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(map(matches, value, args)))
    if origin in (list, collections.abc.Sequence) or ann in (list, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin in (dict, collections.abc.Mapping) or ann is dict:
        return isinstance(value, dict)
    return True


def type_text(ann: Any) -> str:
    """An annotation as a user reads it: ``Sequence[int]``, ``float | None``."""
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")


def check_kwargs(kwargs: dict, fn: Any, what: str, exclude: tuple[str, ...] = ()) -> None:
    """Unknown keyword arguments of ``fn`` (with a did-you-mean) and values that do not fit its annotations
    -> ``ConfigError`` naming the argument."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{what} must be a mapping, got {_show(kwargs)}")
    known, open_ = _accepted_kwargs(fn)
    for name in exclude:
        known.pop(name, None)
    _check_against(kwargs, known, open_, what)


def _check_against(kwargs: dict, known: dict[str, Any], open_: bool, what: str) -> None:
    for key, value in kwargs.items():
        if key not in known:
            if open_:
                continue
            raise ConfigError(f"{what}: unknown argument {key!r}{did_you_mean(key, known)}; "
                              f"known: {', '.join(sorted(known)) or 'none'}")
        if not matches(value, known[key]):
            raise ConfigError(f"{what}: argument {key!r} must be {type_text(known[key])}, got {_show(value)}")


def validate(cfg: dict) -> None:
    """The whole config against :data:`KEYS`, then the rules across keys and the method's hparams."""
    check(cfg)
    check_kwargs(cfg["model"]["kwargs"], models.MODELS.get(cfg["model"]["name"]), "model.kwargs",
                 exclude=("num_classes",))
    id_sets = data.names("id")
    if cfg["data"]["id"] not in id_sets:
        raise ConfigError(f"config key 'data.id' must be an ID dataset (one with classes: "
                          f"{', '.join(id_sets)}), got {cfg['data']['id']!r}{did_you_mean(cfg['data']['id'], id_sets)}")
    aux = cfg["data"]["aux"]
    if aux is not None:
        if aux not in data.DATASETS or "train" not in data.DATASETS.get(aux)().splits:
            train_sets = [n for n in data.DATASETS.names() if "train" in data.DATASETS.get(n)().splits]
            raise ConfigError(f"config key 'data.aux' must be a dataset with a train split ({', '.join(train_sets)})"
                              f" or null, got {aux!r}{did_you_mean(aux, train_sets)}")
        if aux == cfg["data"]["id"]:
            raise ConfigError(f"config key 'data.aux' is the ID set {aux!r}: outliers must come from another set")
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

        more, open_ = _accepted_kwargs(KMeans)
        known = {**more, **known}
    for name in ("x", "k", "seed", "n_clusters", "random_state"):  # set by the sampler
        known.pop(name, None)
    _check_against(kw, known, open_, f"method.hparams.kmeans_kwargs ({backend} backend)")


def make_method(cfg: dict):
    """The configured method; a method with a ``seed`` hparam left unset gets one derived from the run seed."""

    name, hparams = cfg["method"]["name"], dict(cfg["method"]["hparams"])
    if "seed" in methods.METHODS.get(name).defaults and "seed" not in hparams:
        hparams["seed"] = mix(cfg["seed"], SALT_METHOD) % 2**31
    return methods.create(name, **hparams)


def mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (no Python hash randomization)."""
    return int(
        np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(2, np.uint64)[0] >> 1
    )
