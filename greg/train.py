"""The method-agnostic trainer behind ``greg train``.

A run is a pure function of its resolved config: data order and augmentation are derived from
``(seed, stream, epoch, index)``, the learning rate from the step number, and every other random state is
checkpointed. A run killed at any point and restarted with the same command therefore ends with the same
weights as an uninterrupted one (on CPU; cuDNN nondeterminism aside on GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from greg import io

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

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143


class ConfigError(ValueError):
    pass


class NonFiniteError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- config


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


def load_config(paths: list[str | os.PathLike], sets: list[str] | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        with open(p, encoding="utf-8") as f:
            try:
                data = io.yaml_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from e
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
    from greg import data, models

    if cfg["model"]["name"] not in models.MODELS:
        raise ConfigError(
            f"model.name: unknown model {cfg['model']['name']!r}; known: {models.MODELS.names()}"
        )
    for key in ("id", "aux"):
        name = cfg["data"][key]
        if name is not None and name not in data.DATASETS:
            raise ConfigError(f"data.{key}: unknown dataset {name!r}; known: {data.DATASETS.names()}")
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
    if method.needs_aux and cfg["data"]["aux"] is None:
        raise ConfigError(f"method {cfg['method']['name']!r} needs auxiliary data: set data.aux")


def make_method(cfg: dict):
    """The configured method; a method with a ``seed`` hparam left unset gets one derived from the run seed."""
    from greg import methods

    name, hparams = cfg["method"]["name"], dict(cfg["method"]["hparams"])
    if "seed" in methods.METHODS.get(name).defaults and "seed" not in hparams:
        hparams["seed"] = _mix(cfg["seed"], 3) % 2**31
    return methods.create(name, **hparams)


# --------------------------------------------------------------------------------------------- data


def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (no Python hash randomization)."""
    return int(
        np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(2, np.uint64)[0] >> 1
    )


def _perm(n: int, *key: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(*key)))


class StreamSampler(Sampler):
    """Yields ``(item_seed, index)`` for stream positions ``start, start+1, ...``.

    Position ``p`` belongs to pass ``p // per_pass`` over the data, which uses its own permutation; so
    the item at any position is known without replaying the stream, and augmentation is seeded per item.
    """

    def __init__(self, n: int, per_pass: int, seed: int, stream: int, start: int, stop: int | None):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.per_pass, self.seed, self.stream = n, per_pass, seed, stream
        self.start, self.stop = start, stop
        self._cache: tuple[int, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start
        while self.stop is None or p < self.stop:
            rnd, off = divmod(p, self.per_pass)
            if self._cache is None or self._cache[0] != rnd:
                # A pass longer than the data (tiny aux sets) concatenates permutations.
                reps = math.ceil(self.per_pass / self.n)
                perm = torch.cat([_perm(self.n, self.seed, self.stream, rnd, r) for r in range(reps)])
                self._cache = (rnd, perm)
            idx = int(self._cache[1][off])
            yield _mix(self.seed, self.stream, rnd, off), idx
            p += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("infinite stream")
        return self.stop - self.start


class SeededItems(Dataset):
    """Runs the wrapped dataset's random transforms under a per-item seed (worker- and resume-independent)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        item_seed, idx = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            return self.dataset[idx]


def _loader(ds: Dataset, sampler: StreamSampler, batch_size: int, workers: int, device: torch.device):
    return DataLoader(
        SeededItems(ds),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        # Its own generator: creating the iterator must not draw from the global RNG we checkpoint.
        generator=torch.Generator().manual_seed(sampler.seed),
    )


# --------------------------------------------------------------------------------------------- schedule


def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, sched: dict) -> float:
    """Learning-rate multiplier at ``step`` (0-based), a pure function so resume needs no scheduler state."""
    name = sched["name"]
    if name == "constant":
        return 1.0
    if name == "cosine":
        # Energy-OOD's cosine_annealing(step, total, 1, lr_min_ratio) inside a LambdaLR.
        lo = sched["lr_min_ratio"]
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(step / total_steps * math.pi))
    if name == "multistep":
        epoch = step // steps_per_epoch
        return sched["gamma"] ** sum(epoch >= m for m in sched["milestones"])
    raise ConfigError(f"unknown schedule {name!r}")


def make_optimizer(params, optim: dict) -> torch.optim.Optimizer:
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim["lr"],
            momentum=optim["momentum"],
            nesterov=optim["nesterov"] and optim["momentum"] > 0,
            weight_decay=optim["weight_decay"],
        )
    return torch.optim.Adam(
        params, lr=optim["lr"], betas=tuple(optim["betas"]), weight_decay=optim["weight_decay"]
    )


# --------------------------------------------------------------------------------------------- trainer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_text(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=True)


class Trainer:
    def __init__(self, cfg: dict, out: str | os.PathLike, device: str = "auto"):
        from greg import data, models

        self.cfg = cfg
        self.out = Path(out)
        self.device = resolve_device(device)
        c_data, c_train = cfg["data"], cfg["train"]
        self.method = make_method(cfg)
        spec = data.spec(c_data["id"])
        self.num_classes = spec.num_classes + getattr(self.method, "extra_classes", 0)

        torch.manual_seed(_mix(cfg["seed"], 0))
        self.model = models.create(cfg["model"]["name"], self.num_classes, **cfg["model"]["kwargs"])
        if cfg["init"]["checkpoint"]:
            self._init_from(cfg["init"]["checkpoint"], cfg["init"]["kind"])
        self.model.to(self.device)

        self.id_train = data.load(c_data["id"], "train", c_data["root"], train=c_data["augment"])
        if len(self.id_train) < c_data["batch_size"]:
            raise ConfigError(
                f"data.batch_size={c_data['batch_size']} exceeds the {len(self.id_train)} training images "
                f"of {c_data['id']!r}"
            )
        self.aux = None
        self.aux_bs = 0
        if self.method.needs_aux:
            self.aux = data.load(
                c_data["aux"], "train", c_data["root"], id_dataset=c_data["id"], train=c_data["augment"]
            )
            if len(self.aux) == 0:
                raise ConfigError(f"auxiliary dataset {c_data['aux']!r} is empty (root {c_data['root']})")
            abs_ = c_data["aux_batch_size"]
            how = ""
            if abs_ == "ratio":
                abs_ = max(1, round(len(self.aux) / len(self.id_train) * c_data["batch_size"]))
                how = f" ('ratio': {len(self.aux)} auxiliary / {len(self.id_train)} ID images x batch_size)"
            self.aux_bs = int(abs_)
            if self.aux_bs < self.method.aux_needed():
                raise ConfigError(
                    f"data.aux_batch_size is {self.aux_bs}{how}, but method {cfg['method']['name']!r} selects "
                    f"{self.method.aux_needed()} auxiliary samples per step (method.hparams.n_selected): "
                    "raise data.aux_batch_size or lower n_selected"
                )

        self.steps_per_epoch = len(self.id_train) // c_data["batch_size"]
        total = c_train["epochs"] * self.steps_per_epoch
        if c_train["max_steps"]:
            total = min(total, c_train["max_steps"]) if c_train["epochs"] > 0 else c_train["max_steps"]
        self.total_steps = total
        self.optimizer = make_optimizer(self.model.parameters(), cfg["optim"])
        self.step = 0
        self._stop_signal: int | None = None

    # -- init / checkpoints -------------------------------------------------------------------------

    def _init_from(self, path: str, kind: str) -> None:
        from greg import models

        raw = io.safe_torch_load(path)
        is_run = isinstance(raw, dict) and raw.get("format") == "greg-model-v1"
        # (K+1)-class methods (DOS, OpenMix) start from a K-class model with a fresh head.
        extra = getattr(self.method, "extra_classes", 0)
        skip_head = bool(self.cfg["init"]["skip_head"])
        if kind == "run" or (kind == "auto" and is_run):
            if not is_run:
                raise ConfigError(f"init.checkpoint {path} is not a greg run checkpoint (final.pt)")
            k = raw["num_classes"]
            if raw["arch"] != self.cfg["model"]["name"] or k not in (
                self.num_classes,
                self.num_classes - extra,
            ):
                raise ConfigError(
                    f"init.checkpoint {path} holds {raw['arch']} with {k} classes, but this run "
                    f"trains {self.cfg['model']['name']} with {self.num_classes} classes"
                )
            models.load_pretrained(self.model, path, skip_head=skip_head or k != self.num_classes)
        else:
            models.load_pretrained(self.model, path, skip_head=skip_head or extra > 0)

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    @property
    def final_path(self) -> Path:
        return self.out / "final.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _check_finite_weights(self) -> None:
        for name, p in self.model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteError(f"parameter {name!r} became non-finite at step {self.step}")

    def save_state(self) -> None:
        self._check_finite_weights()  # never replace the last good checkpoint with a broken one
        io.atomic_torch_save(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(),
                "rng": _rng_state(),
                "config": _config_text(self.cfg),
            },
            self.state_path,
        )

    def load_state(self) -> bool:
        if not self.state_path.exists():
            return False
        state = io.safe_torch_load(self.state_path, map_location=self.device)
        if state["config"] != _config_text(self.cfg):
            raise ConfigError(
                f"{self.state_path} was written by a different config; delete {self.out} to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        return True

    def _trim_log(self) -> None:
        """Drop log lines of steps after the resumed checkpoint (and a torn last line)."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) < self.step:
                keep.append(line)
        io.atomic_write_text(self.log_path, "".join(k + "\n" for k in keep))

    # -- loop ----------------------------------------------------------------------------------------

    def _train_step(self, batch: dict) -> dict:
        # Methods with their own update rule (SAM: two forward/backward passes) define train_step.
        custom = getattr(self.method, "train_step", None)
        if custom is not None:
            terms = custom(self.model, batch, self.optimizer)
        else:
            terms = self.method.compute_loss(self.model, batch)
        total = terms["total"]
        if not torch.isfinite(total):
            raise NonFiniteError(
                f"loss is {float(total.detach())} at step {self.step} "
                f"({', '.join(f'{k}={float(torch.as_tensor(v).detach()):.4g}' for k, v in terms.items())})"
            )
        if custom is None:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
        return terms

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        from greg import models

        if self.final_path.exists():
            print(f"{self.final_path} exists: run already complete", file=sys.stderr)
            return 0
        self.out.mkdir(parents=True, exist_ok=True)
        # Temp files of a write that a SIGKILL interrupted are never outputs; don't let them pile up.
        for stale in self.out.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        cfg_file = self.out / "config.yaml"
        if not self.load_state():
            io.atomic_write_text(cfg_file, _config_text(self.cfg))
            self._trim_log_all()
        else:
            print(f"resuming {self.out} from step {self.step}/{self.total_steps}", file=sys.stderr)
            self._trim_log()

        c_data, c_train = self.cfg["data"], self.cfg["train"]
        bs, seed = c_data["batch_size"], self.cfg["seed"]
        id_iter = iter(
            _loader(
                self.id_train,
                StreamSampler(
                    len(self.id_train),
                    self.steps_per_epoch * bs,
                    seed,
                    1,
                    self.step * bs,
                    self.total_steps * bs,
                ),
                bs,
                c_data["num_workers"],
                self.device,
            )
        )
        aux_iter = None
        if self.aux is not None:
            per_pass = max(len(self.aux) // self.aux_bs, 1) * self.aux_bs
            aux_iter = iter(
                _loader(
                    self.aux,
                    StreamSampler(
                        len(self.aux),
                        per_pass,
                        seed,
                        2,
                        self.step * self.aux_bs,
                        self.total_steps * self.aux_bs,
                    ),
                    self.aux_bs,
                    c_data["num_workers"],
                    self.device,
                )
            )

        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            from tqdm.auto import tqdm

            with (
                open(self.log_path, "a", encoding="utf-8") as log,
                tqdm(
                    total=self.total_steps,
                    initial=self.step,
                    desc=f"train {self.cfg['method']['name']}",
                    disable=not c_train["progress"],
                    mininterval=1.0 if sys.stderr.isatty() else 30.0,
                    dynamic_ncols=True,
                ) as bar,
            ):
                if not self._loop(id_iter, aux_iter, log, bar):
                    print(
                        f"signal {self._stop_signal}: checkpointed at step {self.step}; rerun to resume",
                        file=sys.stderr,
                    )
                    return EXIT_PREEMPTED
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        self.save_state()
        self.model.eval()
        models.save_checkpoint(
            self.final_path,
            self.model,
            arch=self.cfg["model"]["name"],
            num_classes=self.num_classes,
            model_kwargs=self.cfg["model"]["kwargs"],
            meta={
                "method": self.cfg["method"]["name"],
                "detector": getattr(self.method, "detector", "energy"),
                "id_dataset": c_data["id"],
                "seed": self.cfg["seed"],
                "steps": self.step,
                "config": _config_text(self.cfg),
            },
        )
        return 0

    def _loop(self, id_iter, aux_iter, log, bar) -> bool:
        """Train until the last step (True) or until a stop signal, after checkpointing (False)."""
        c_train = self.cfg["train"]
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            if self.step % self.steps_per_epoch == 0:
                self.method.on_epoch_start(self.model, self.step // self.steps_per_epoch)
            x_id, y_id = next(id_iter)
            batch = {
                "x_id": x_id.to(self.device, non_blocking=True),
                "y_id": y_id.to(self.device, non_blocking=True),
            }
            if aux_iter is not None:
                batch["x_aux"] = next(aux_iter)[0].to(self.device, non_blocking=True)
            lr = self.cfg["optim"]["lr"] * lr_multiplier(
                self.step, self.total_steps, self.steps_per_epoch, self.cfg["schedule"]
            )
            for g in self.optimizer.param_groups:
                g["lr"] = lr

            self.model.train()
            terms = self._train_step(batch)

            rec = {"step": self.step, "epoch": self.step // self.steps_per_epoch, "lr": lr}
            rec.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
            gne = c_train["grad_norm_every"]
            if gne and self.step % gne == 0:
                rec.update(self._grad_norms(batch, c_train["grad_norm_score"]))
            rec["time"] = time.perf_counter() - t0
            self.step += 1
            if c_train["log_every"] and (self.step - 1) % c_train["log_every"] == 0:
                log.write(json.dumps(rec, sort_keys=True) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['total']:.3f}", lr=f"{lr:.2g}", refresh=False)

            at_epoch_end = self.step % self.steps_per_epoch == 0
            if self._stop_signal is not None or at_epoch_end or self.step % c_train["checkpoint_every"] == 0:
                self.save_state()
            if self._stop_signal is not None:
                return False
        return True

    def _grad_norms(self, batch: dict, score: str) -> dict[str, float]:
        """Mean input-gradient norm of the score (paper Fig. 3), on the ID and auxiliary batches."""
        from greg.methods.grad_reg import score_input_grad_norm

        rec = {"grad_norm_id": score_input_grad_norm(self.model, batch["x_id"], score)}
        if "x_aux" in batch:
            rec["grad_norm_aux"] = score_input_grad_norm(self.model, batch["x_aux"], score)
            rec["score_grad_norm"] = 0.5 * (rec["grad_norm_id"] + rec["grad_norm_aux"])
        else:
            rec["score_grad_norm"] = rec["grad_norm_id"]
        return rec

    def _trim_log_all(self) -> None:
        if self.log_path.exists():
            self.log_path.unlink()


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="YAML",
        help="run config; repeat to merge several, later files override earlier ones",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted path; VALUE parsed as YAML), e.g. --set seed=2",
    )
    p.add_argument(
        "--out", required=True, help="run directory (final.pt, state.pt, metrics.jsonl, config.yaml)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    from greg.errors import EXIT_STATUS_HELP

    p.epilog = (
        f"{EXIT_STATUS_HELP} Also: {EXIT_NONFINITE} the loss or the weights became NaN/inf (the last good "
        f"checkpoint is kept); {EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after checkpointing (rerun the same "
        "command to resume). Every config key is documented in greg/train.py DEFAULTS (greg train "
        "--print-config shows the resolved config)."
    )


def run(args: argparse.Namespace) -> int:
    from greg.errors import cli_errors

    with cli_errors("greg train") as ce:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(_config_text(cfg), end="")
            return 0
        try:
            return Trainer(cfg, args.out, args.device).run()
        except NonFiniteError as e:
            state = Path(args.out) / "state.pt"
            kept = (
                f"the last good checkpoint is kept in {state}"
                if state.exists()
                else "no checkpoint was written"
            )
            print(f"greg train: stopped: {e}; {kept}", file=sys.stderr)
            return EXIT_NONFINITE
    return ce.code
