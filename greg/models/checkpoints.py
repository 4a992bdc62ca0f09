"""Weights in and out: external checkpoints (``load_pretrained``) and greg run checkpoints
(``save_checkpoint`` / ``load_checkpoint``, format ``greg-model-v1``, see docs/ARCHITECTURE.md).

Everything is read through ``greg.io.safe_torch_load`` (weights_only=True) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greg.errors import InputError
from greg.io import atomic_torch_save, safe_torch_load
from greg.models._registry import MODELS

FORMAT = "greg-model-v1"
_RUN_KEYS = ("format", "arch", "num_classes", "model_kwargs", "state_dict", "meta")
# Containers that may hold a state_dict in third-party checkpoints, in order of preference.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
_SHOW = 5  # keys listed per category in error messages


class CheckpointError(ValueError):
    """A checkpoint file does not fit (wrong format, architecture, keys or shapes)."""


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs; records ``arch``/``num_classes``/``model_kwargs``
    on the instance so checkpoints can check they are loaded into the same architecture."""
    model = MODELS.create(name, num_classes=num_classes, **kwargs)
    model.arch = name
    model.num_classes = num_classes
    model.model_kwargs = dict(kwargs)
    return model


# ---------------------------------------------------------------------------------------------- helpers
def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _diff(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> tuple[list, list, list]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [(k, got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]]
    return missing, unexpected, mismatched


def _fmt_keys(keys: list) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(map(str, keys[:_SHOW])) + more


def _check_fit(
    expected: Mapping[str, tuple], got: Mapping[str, tuple], what: str, missing_ok: tuple[str, ...] = ()
) -> None:
    missing, unexpected, mismatched = _diff(expected, got)
    missing = [k for k in missing if not k.endswith(missing_ok)] if missing_ok else missing
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what}: the state_dict does not match the model"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_fmt_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
    if mismatched:
        items = [f"{k} (file {tuple(a)} vs model {tuple(b)})" for k, a, b in mismatched]
        lines.append(f"  {len(mismatched)} shape mismatches: {_fmt_keys(items)}")
    raise CheckpointError("; ".join(lines))


def _check_plain(obj: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` reads back: str-keyed dicts, lists, tuples, scalars."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int, not {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} must hold plain types (dict/list/tuple/str/int/float/bool/None), found {type(obj).__name__}"
    )


# Largest model greg builds from a config (assumption: the paper's largest, DenseNet-121 for ImageNet at ~32 MB
# of float32 weights, times ~300; a typo such as widths [16000, ...] is refused instead of exhausting memory).
MAX_MODEL_BYTES = 10 * 10**9


def model_bytes(arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> int:
    """Bytes of the parameters and buffers of ``create(arch, num_classes, **kwargs)``, counted on the meta
    device (nothing allocated): sizes are checked before a model is built from a file's or config's kwargs."""
    with torch.device("meta"):
        ref = create(arch, num_classes, **kwargs)
    return sum(t.numel() * t.element_size() for t in ref.state_dict().values())


def check_model_size(arch: str, num_classes: int, kwargs: Mapping[str, Any], what: str) -> None:
    """Refuse (one line starting with ``what``: the flag or key that gave the sizes) a model above
    :data:`MAX_MODEL_BYTES`, counted before it is built."""
    size = model_bytes(arch, num_classes, kwargs)
    if size > MAX_MODEL_BYTES:
        raise InputError(f"{what} describe a {arch} of {_gb(size)} of weights (at most {_gb(MAX_MODEL_BYTES)}): "
                         "check the sizes")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


# ------------------------------------------------------------------------------------ external weights
def _extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a checkpoint, and a short description of the container for messages."""
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj["state_dict"]), f"greg run checkpoint (arch {obj.get('arch')!r})"
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "bare state_dict"
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            sd = obj.get(key)
            if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
                extra = {k: obj[k] for k in ("arch", "epoch") if isinstance(obj.get(k), (str, int))}
                return dict(sd), f"{{{key!r}: ...}} checkpoint {extra}" if extra else f"{{{key!r}: ...}}"
        raise CheckpointError(
            f"{path}: no state_dict found; top-level keys {sorted(map(str, obj))[:10]}, "
            f"expected a tensor dict or one under {_STATE_DICT_KEYS}"
        )
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")


def map_pretrained_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an external state_dict's keys to ``model``'s: strip DataParallel's ``module.`` prefix, then
    the model's ``map_pretrained_key`` (e.g. ``fc.``/``linear.`` -> ``head.``)."""
    mapper = getattr(model, "map_pretrained_key", lambda k: k)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        while new.startswith("module."):
            new = new[len("module.") :]
        new = mapper(new)
        if new in out:
            raise CheckpointError(f"keys collide after renaming: {key!r} -> {new!r}")
        out[new] = value
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, skip_head: bool = False) -> nn.Module:
    """Load external weights into ``model`` with ``strict=True`` after the key map; returns ``model``.

    Accepts a bare state_dict, ``{"state_dict": ...}``-style containers (the two shared DenseNet-BC-100
    files: ``{epoch, state_dict}`` with ``fc``, and ``{epoch, arch, state_dict, cla_acc}`` with
    ``module.`` and ``linear``), torchvision layouts, and greg run checkpoints. Any missing, unexpected
    or mis-shaped key raises ``CheckpointError`` naming the file and (a few of) the keys.
    ``skip_head=True`` leaves ``head`` as initialized (e.g. a K+1-class model from a K-class checkpoint).
    """
    path = Path(path)
    sd, kind = _extract_state_dict(safe_torch_load(path, map_location="cpu"), path)
    sd = map_pretrained_keys(model, sd)
    own = model.state_dict()
    if skip_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    arch = getattr(model, "arch", type(model).__name__)
    # BatchNorm fills in num_batches_tracked when a pre-0.4.1 file lacks it
    _check_fit(
        _shapes(own), _shapes(sd), f"cannot load {path} ({kind}) into {arch}", ("num_batches_tracked",)
    )
    model.load_state_dict(sd, strict=not skip_head)
    return model


# -------------------------------------------------------------------------------------- run checkpoints
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    model_kwargs: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{"format": "greg-model-v1", arch, num_classes, model_kwargs, state_dict, meta}`` atomically.

    ``model_kwargs`` and ``meta`` must be plain types (loadable with weights_only=True). The model is
    checked against ``create(arch, num_classes, **model_kwargs)`` (built on the meta device: no memory)
    so that every file written can be loaded back.
    """
    model_kwargs = dict(model_kwargs or {})
    meta = dict(meta or {})
    _check_plain(model_kwargs, "model_kwargs")
    _check_plain(meta, "meta")
    own_arch = getattr(model, "arch", arch)
    if own_arch != arch:
        raise CheckpointError(f"save_checkpoint({path}): model was created as {own_arch!r}, not {arch!r}")
    with torch.device("meta"):
        ref = create(arch, int(num_classes), **model_kwargs)
    state = model.state_dict()
    _check_fit(
        _shapes(ref.state_dict()),
        _shapes(state),
        f"save_checkpoint({path}): model vs arch={arch!r}, num_classes={num_classes}, {model_kwargs}",
    )
    payload = {
        "format": FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "model_kwargs": model_kwargs,
        # clone: a view would drag its whole storage into the file
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in state.items()},
        "meta": meta,
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw, validated run-checkpoint dict (no model built)."""
    path = Path(path)
    obj = safe_torch_load(path, map_location="cpu")
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        keys = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{path} is not a greg run checkpoint: expected format {FORMAT!r}, found {found!r} "
            f"(top-level keys {keys}); external weights load with greg.models.load_pretrained"
        )
    absent = [k for k in _RUN_KEYS if k not in obj]
    if absent:
        raise CheckpointError(f"{path}: greg run checkpoint lacks keys {absent}")
    # Types too: a file that has the keys but e.g. a string class count must fail here, naming the file.
    for key, typ, what in (("arch", str, "str"), ("num_classes", int, "int"), ("model_kwargs", Mapping, "dict"),
                           ("state_dict", Mapping, "dict"), ("meta", Mapping, "dict")):
        v = obj[key]
        if not isinstance(v, typ) or isinstance(v, bool):
            raise CheckpointError(f"{path}: {key} must be a {what}, found {type(v).__name__} ({_short(v)})")
    if obj["num_classes"] < 1:
        raise CheckpointError(f"{path}: num_classes must be >= 1, found {obj['num_classes']}")
    odd = [k for k, v in obj["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: state_dict must map names to tensors; bad entries: {_fmt_keys(odd)}")
    if not all(isinstance(k, str) for k in obj["model_kwargs"]):
        raise CheckpointError(f"{path}: model_kwargs keys must be strings")
    return dict(obj)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_described_model(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """The model a run checkpoint's ``arch``/``num_classes``/``model_kwargs`` describe, built on the meta device
    (nothing allocated), has the size and shapes of its ``state_dict``: kwargs describing a far larger model
    (a tampered or mixed-up file) are refused before anything is built."""
    arch, num_classes, kwargs = ckpt["arch"], ckpt["num_classes"], dict(ckpt["model_kwargs"])
    try:
        with torch.device("meta"):
            ref = create(arch, num_classes, **kwargs)
    except KeyError as e:  # unknown arch
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:  # model_kwargs the architecture does not take
        raise CheckpointError(f"{path}: model_kwargs {_short(kwargs)} do not fit {arch!r}: {e}") from None
    want = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    have = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    if want > have:
        raise CheckpointError(f"{path}: model_kwargs {_short(kwargs)} describe a model of {_gb(want)} but the "
                              f"file's state_dict holds {_gb(have)}; not building it")
    _check_fit(_shapes(ref.state_dict()), _shapes(ckpt["state_dict"]),
               f"cannot load {path} (arch {arch!r}, {num_classes} classes, {_short(kwargs)})")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a run checkpoint describes (or fill ``model``, which must be the same
    architecture) and load its weights strictly; returns ``(model, meta)`` with the model on ``device``."""
    ckpt = read_checkpoint(path)
    arch, num_classes, kwargs = ckpt["arch"], ckpt["num_classes"], dict(ckpt["model_kwargs"])
    if model is None:
        check_described_model(ckpt, path)
        model = create(arch, num_classes, **kwargs)
    else:
        own = getattr(model, "arch", None)
        if own is not None and own != arch:
            raise CheckpointError(f"{path} holds a {arch!r} model; cannot load it into a {own!r} model")
        _check_fit(
            _shapes(model.state_dict()),
            _shapes(ckpt["state_dict"]),
            f"cannot load {path} (arch {arch!r}, {num_classes} classes, {kwargs}) into the given model",
        )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device), dict(ckpt["meta"])
