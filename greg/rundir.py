"""A training run's directory: which files it holds, whose they are, and how they are written and read back.

``<out>/`` holds ``config.yaml`` (this run's resolved config), ``metrics.jsonl`` (one line per logged
step), ``state.pt`` (the resume state: step, model, optimizer, method state, every RNG) and, once the run
is complete, ``final.pt`` (a ``greg.models`` run checkpoint). A directory belongs to one scientific config:
a state or final checkpoint of another config is refused with the keys that differ (runtime keys such as
workers or the data root may change between attempts). The trainer holds :meth:`RunDir.lock` while it
works here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from greg import io, models
from greg.config import ConfigError, config_diff, config_hash, config_text
from greg.errors import cap, error_text

# state.pt: key -> type; "rng" -> the keys set_rng_state reads.
_STATE_TYPES = {"step": int, "model": dict, "optimizer": dict, "method": dict, "rng": dict, "config": str}
# python_pos is random's gauss_next (a float or None), despite its name
_RNG_KEYS = {"torch": torch.Tensor, "python": list, "python_pos": (float, int, type(None)), "numpy": list,
             "numpy_pos": int}
_MT_N = 624  # words of MT19937's key: numpy's position runs 0..624


def rng_state() -> dict:
    """Every global RNG the run draws from (torch, Python, NumPy; CUDA where present)."""
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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving process; a requeue may land on a node that shows fewer
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _bad_state(path: Path, what: str) -> models.CheckpointError:
    return models.CheckpointError(cap(f"{path} is not a greg resume state: {what}; delete it (the run restarts "
                                      "from step 0) or rerun with --force", 600))


def check_rng(state: dict, path: Path) -> None:
    """Each RNG state set on a fresh generator first: a short or garbled one is refused before any is used."""
    tries = (
        ("rng.torch", lambda: torch.Generator().set_state(state["torch"])),
        ("rng.python", lambda: random.Random().setstate((3, tuple(state["python"]), state["python_pos"]))),
        ("rng.numpy", lambda: np.random.RandomState().set_state(
            ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))),
    )
    for name, attempt in tries:
        try:
            attempt()
        except (ValueError, TypeError, IndexError, RuntimeError, OverflowError) as e:
            raise _bad_state(path, f"{name} is not a valid generator state ({e})") from None
    if not 0 <= state["numpy_pos"] <= _MT_N:  # numpy takes any position, then reads past its key
        raise _bad_state(path, f"rng.numpy_pos is {state['numpy_pos']}, expected 0..{_MT_N}")
    # checked without a GPU (the CPU job that reads a GPU run's state, a CPU node): a list of equally long
    # byte tensors, one per GPU, as torch.cuda.get_rng_state_all() returns
    cuda = state.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, (list, tuple))
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() > 0
                for t in cuda)
        and len({t.numel() for t in cuda}) <= 1
    ):
        raise _bad_state(path, "rng.cuda is not a list of CUDA generator states (equally long uint8 tensors)")


def check_model_state(sd: object, model: torch.nn.Module, path: Path) -> None:
    """The saved weights have exactly the model's keys and shapes (strict loading would dump them all)."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise _bad_state(path, "model state must map names to tensors")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if own == got:
        return
    missing = [k for k in own if k not in got]
    unexpected = [k for k in got if k not in own]
    shapes = [f"{k} {got[k]} vs {own[k]}" for k in own if k in got and got[k] != own[k]]
    parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
             for what, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if v]
    raise _bad_state(path, f"model state does not match the model: {'; '.join(parts)}")


_ABSENT = object()


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _same_kind(v: object, like: object) -> bool:
    """``v`` is a value of ``like``'s kind: numbers (finite), flags, strings, None, same-length sequences."""
    if v is _ABSENT:  # a key of a newer torch: the optimizer fills in its default
        return True
    if like is None:  # foreach / fused: "choose for me" or a choice
        return v is None or isinstance(v, bool)
    if isinstance(like, (bool, str)):
        return type(v) is type(like)
    if isinstance(like, (int, float)):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(like, (list, tuple)):
        return isinstance(v, (list, tuple)) and len(v) == len(like) and all(map(_same_kind, v, like))
    return True  # a kind greg's optimizers do not use: left to the optimizer


def check_optimizer_state(sd: object, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The saved optimizer state has this optimizer's groups, parameter counts and per-parameter shapes."""
    if not isinstance(sd, dict) or "param_groups" not in sd or "state" not in sd:
        missing = "param_groups" if isinstance(sd, dict) and "param_groups" not in sd else "state"
        raise _bad_state(path, f"optimizer state has no {missing!r}")
    own = optimizer.state_dict()["param_groups"]
    groups, per_param = sd["param_groups"], sd["state"]

    def mismatch(what: str) -> models.CheckpointError:
        return _bad_state(path, f"optimizer state does not match the optimizer ({what})")

    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise mismatch("param_groups must be a list of groups with params")
    counts, want = [len(g["params"]) for g in groups], [len(g["params"]) for g in own]
    if counts != want:
        raise mismatch(f"parameters per group {counts[:5]}, expected {want[:5]}")
    for n, (g, o) in enumerate(zip(groups, own, strict=True)):
        for key, want_v in o.items():  # hyperparameters of the kind this optimizer keeps (a number stays a number)
            if key != "params" and not _same_kind(g.get(key, _ABSENT), want_v):
                raise mismatch(f"group {n} {key} is {_short(g[key])}, expected one like "
                               f"{_short(want_v)}")
    if not isinstance(per_param, dict):
        raise mismatch("state must be a dict")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {i: params[n] for n, i in enumerate(i for g in groups for i in g["params"])}
    for i, entry in per_param.items():
        if i not in index or not isinstance(entry, dict):
            raise mismatch(f"state of unknown parameter {str(i)[:20]}")
        for key, v in entry.items():  # buffers (momentum, moments) have the parameter's shape; counters are scalars
            if isinstance(v, torch.Tensor) and v.numel() != 1 and v.shape != index[i].shape:
                raise mismatch(f"{str(key)[:20]} of parameter {i} has shape {tuple(v.shape)}, expected "
                               f"{tuple(index[i].shape)}")


def check_state(state: object, path: Path) -> None:
    """A resume state of the expected shape, or one ``CheckpointError`` naming the file and the key."""
    def bad(what: str) -> models.CheckpointError:
        return _bad_state(path, what)

    if not isinstance(state, dict):
        raise bad(f"expected a dict, found {type(state).__name__}")
    for table, where in ((_STATE_TYPES, ""), (_RNG_KEYS, "rng.")):
        d = state if not where else state["rng"]
        for key, typ in table.items():
            if key not in d:
                raise bad(f"no {where}{key!r} entry")
            if not isinstance(d[key], typ) or isinstance(d[key], bool):
                want = "/".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
                raise bad(f"{where}{key} is a {type(d[key]).__name__}, expected {want}")
    if state["step"] < 0:
        raise bad(f"step is {state['step']}")
    check_rng(state["rng"], path)


class RunDir:
    """The files of one run directory ``out`` for the run config ``cfg``."""

    def __init__(self, out: str | Path, cfg: dict):
        self.out = Path(out)
        self.cfg = cfg

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    @property
    def final_path(self) -> Path:
        return self.out / "final.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.out / "config.yaml"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One greg process per run directory (a second one would replace this one's checkpoints); greg's
        temp files of writers that a SIGKILL interrupted are removed once the lock is held."""
        with io.dir_lock(self.out, "run directory"):
            io.remove_stale_temp_files(self.out, locked=True)
            yield

    def discard(self) -> None:
        """``--force``: this run's own checkpoints go (the log is cleared by the fresh start)."""
        for p in (self.final_path, self.state_path):
            p.unlink(missing_ok=True)

    def write_config(self) -> None:
        # runtime keys (workers, data root, cadence) may have changed on resume: config.yaml shows this run's
        io.atomic_write_text(self.config_path, config_text(self.cfg))

    # -- identity -------------------------------------------------------------------------------------

    def check_same_run(self, path: Path, stored: object, verb: str) -> None:
        """The run stored in ``path`` must have this run's scientific config (runtime keys may differ)."""
        try:
            old = yaml.safe_load(stored) if isinstance(stored, str) else None
        except yaml.YAMLError:
            old = None
        if not isinstance(old, dict):
            raise ConfigError(f"{path} records no readable run config; rerun with --force to start over, or "
                              "use a new --out")
        diff = config_diff(old, self.cfg)
        if diff:
            more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ConfigError(
                f"{path} {verb} a different config (differs in {', '.join(diff[:3])}{more}); rerun with "
                "--force to start over in this directory, or use a new --out (a workflow run after a recipe "
                f"change: delete {self.out} and rerun snakemake)"
            )

    def check_final(self, num_classes: int) -> None:
        """final.pt of this very config, and readable (format, types, shapes of the model it describes)."""
        try:
            ck = models.read_checkpoint(self.final_path)
        except (ValueError, RuntimeError, EOFError) as e:
            raise models.CheckpointError(
                f"{self.final_path} exists but is not a valid run checkpoint ({e}); rerun with --force to "
                "train again, or use a new --out"
            ) from None
        meta = ck["meta"]
        if meta.get("config_hash") != config_hash(self.cfg):  # files of older versions: compare the text
            self.check_same_run(self.final_path, meta.get("config"), "was trained with")
        arch = self.cfg["model"]["name"]
        if ck["arch"] != arch or ck["num_classes"] != num_classes:
            raise models.CheckpointError(
                f"{self.final_path} holds {ck['arch']} with {ck['num_classes']} classes, this config trains "
                f"{arch} with {num_classes}; rerun with --force, or use a new --out"
            )

    # -- resume state ---------------------------------------------------------------------------------

    def save_state(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Any) -> None:
        io.atomic_torch_save(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "method": method.state_dict(),
                "rng": rng_state(),
                "config": config_text(self.cfg),
                "config_hash": config_hash(self.cfg),
            },
            self.state_path,
        )

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Any,
                   device: torch.device, total_steps: int) -> int | None:
        """Restore model, optimizer, method and RNGs from state.pt; the step to resume from, or None when
        there is no state (a fresh start). Every part is checked against this run before any is used."""
        if not self.state_path.exists():
            return None
        state = io.safe_torch_load(self.state_path, map_location=device)
        check_state(state, self.state_path)
        self.check_same_run(self.state_path, state["config"], "was written by")
        if state["step"] > total_steps:  # not "done": a state of another length or a tampered one
            raise _bad_state(self.state_path, f"step {state['step']} is beyond this run's {total_steps} steps")
        check_model_state(state["model"], model, self.state_path)
        check_optimizer_state(state["optimizer"], optimizer, self.state_path)
        # the method checks its own state as it loads it: first, so that a failure leaves model and optimizer as built
        try:
            method.load_state_dict(state["method"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise _bad_state(self.state_path, f"method state does not fit: {error_text(e)}") from None
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise _bad_state(self.state_path, f"optimizer state does not match the optimizer ({e})") from None
        set_rng_state(state["rng"])
        return state["step"]

    def save_final(self, model: torch.nn.Module, num_classes: int, meta: dict[str, Any]) -> None:
        """final.pt: the model with the run's identity (config text and hash) in its meta."""
        models.save_checkpoint(
            self.final_path,
            model,
            arch=self.cfg["model"]["name"],
            num_classes=num_classes,
            model_kwargs=self.cfg["model"]["kwargs"],
            meta={**meta, "config": config_text(self.cfg), "config_hash": config_hash(self.cfg)},
        )

    # -- log ------------------------------------------------------------------------------------------

    def clear_log(self) -> None:
        """A fresh start: no log lines of an earlier attempt (one killed before its first checkpoint)."""
        self.log_path.unlink(missing_ok=True)  # idempotent: a missing log is the goal, not an error

    def open_log(self) -> IO[str]:
        """The log, opened for appending without following a symlink."""
        return io.open_nofollow(self.log_path, "a", encoding="utf-8")

    def _read_log(self) -> str:
        if not os.path.lexists(self.log_path):
            return ""
        with io.open_nofollow(self.log_path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()

    def trim_log(self, step: int) -> None:
        """Drop log lines of steps at or after ``step`` (the resumed checkpoint's) and a torn last line (a
        write cut by a kill: no newline); any other line that is not a JSON object with a numeric step is
        refused, naming the file and line."""
        text = self._read_log()
        if not text:
            return
        lines = text.split("\n")
        torn = lines.pop()  # "" when the file ends with a newline
        keep = []
        for n, line in enumerate(lines, 1):
            rec = self._log_record(line, n)
            if rec.get("step", 0) < step:
                keep.append(line)
        if torn:
            with contextlib.suppress(models.CheckpointError):
                if self._log_record(torn, len(lines) + 1).get("step", 0) < step:
                    keep.append(torn)  # complete but for its newline
        io.atomic_write_text(self.log_path, "".join(k + "\n" for k in keep))

    def _log_record(self, line: str, n: int) -> dict:
        def bad(what: str) -> models.CheckpointError:
            return models.CheckpointError(f"{self.log_path} line {n}: {what}; fix or delete the line, or rerun "
                                          "with --force to start over")

        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise bad(f"not valid JSON ({getattr(e, 'msg', 'too deeply nested')})") from None
        if not isinstance(rec, dict):
            raise bad(f"expected a JSON object, found {type(rec).__name__}")
        step = rec.get("step", 0)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            raise bad(f"'step' must be a number, found {type(step).__name__}")
        return rec

    def last_logged_loss(self) -> float | None:
        """The last logged total loss (a resume that had no step left to run); None if it is not a number."""
        lines = self._read_log().splitlines()
        if not lines:
            return None
        with contextlib.suppress(ValueError, RecursionError):
            rec = json.loads(lines[-1])
            total = rec.get("total") if isinstance(rec, dict) else None
            if isinstance(total, (int, float)) and not isinstance(total, bool):
                return float(total)
        return None
