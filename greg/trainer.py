"""The method-agnostic trainer behind ``greg train``.

A run is a pure function of its resolved config: data order and augmentation are derived from
``(seed, stream, epoch, index)`` (``greg.stream``), the learning rate from the step number, and every other
random state is checkpointed. A run killed at any point and restarted with the same command therefore ends
with the same weights as an uninterrupted one (on CPU; cuDNN nondeterminism aside on GPU).

One cohesive class (init, checkpoints, resume, the loop), hence over ~400 lines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from greg import data, io, models
from greg.config import ConfigError, config_diff, config_hash, config_text, make_method, mix
from greg.device import eval_mode, resolve_device
from greg.methods import margins
from greg.methods.grad_reg import score_input_grad_norm
from greg.optim.registry import lr_multiplier, make_optimizer
from greg.stream import StreamSampler, aux_pool_size, loader, ratio_candidates

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143


class NonFiniteError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- trainer


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


# state.pt: key -> (type, what); "rng" -> the keys _set_rng_state reads.
_STATE_TYPES = {"step": int, "model": dict, "optimizer": dict, "method": dict, "rng": dict, "config": str}
# python_pos is random's gauss_next (a float or None), despite its name
_RNG_KEYS = {"torch": torch.Tensor, "python": list, "python_pos": (float, int, type(None)), "numpy": list,
             "numpy_pos": int}


def _check_state(state: object, path: Path) -> None:
    """A resume state of the expected shape, or one ``CheckpointError`` naming the file and the key."""
    def bad(what: str) -> models.CheckpointError:
        return models.CheckpointError(f"{path} is not a greg resume state: {what}; delete it (the run restarts "
                                      "from step 0) or rerun with --force")

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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_checkpoint_path(cfg: dict) -> str:
    """``init.checkpoint`` as a file: a released checkpoint of the data catalog (``greg data list``, role
    ``weights``) is looked up under ``data.root``, so the run's identity names the checkpoint, not where the
    data lives (moving ``data.root`` must not make it a different run)."""
    ref = cfg["init"]["checkpoint"]
    if ref in data.names("weights"):
        return str(data.weights_path(ref, cfg["data"]["root"]))
    return ref


class Trainer:
    def __init__(self, cfg: dict, out: str | os.PathLike, device: str = "auto", force: bool = False):
        self.cfg = cfg
        self.out = Path(out)
        self.force = force  # start over: discard this directory's final.pt / state.pt of another config
        self.device = resolve_device(device)
        c_data, c_train = cfg["data"], cfg["train"]
        self.method = make_method(cfg)
        spec = data.spec(c_data["id"])
        self.num_classes = spec.num_classes + self.method.extra_classes

        torch.manual_seed(mix(cfg["seed"], 0))
        self.model = models.create(cfg["model"]["name"], self.num_classes, **cfg["model"]["kwargs"])
        if cfg["init"]["checkpoint"]:
            self._init_from(init_checkpoint_path(cfg), cfg["init"]["kind"])
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
            # Each epoch's auxiliary pool (data.aux_pool_per_epoch; the whole set when null).
            self.aux_pool = aux_pool_size(len(self.aux), c_data["aux_pool_per_epoch"])
            abs_ = c_data["aux_batch_size"]
            how = ""
            if abs_ == "ratio":
                abs_ = ratio_candidates(self.aux_pool, len(self.id_train), c_data["batch_size"])
                how = f" ('ratio': {self.aux_pool} auxiliary / {len(self.id_train)} ID images x batch_size)"
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
        self.last_loss: float | None = None  # total loss of the last step this process ran
        self._stop_signal: int | None = None

    # -- init / checkpoints -------------------------------------------------------------------------

    def _init_from(self, path: str, kind: str) -> None:
        raw = io.safe_torch_load(path)
        is_run = isinstance(raw, dict) and raw.get("format") == "greg-model-v1"
        # (K+1)-class methods (DOS, OpenMix) start from a K-class model with a fresh head.
        extra = self.method.extra_classes
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
                "config": config_text(self.cfg),
                "config_hash": config_hash(self.cfg),
                # margins: auto, fitted before step 0 from the starting model: a resume must not refit
                "margins": margins.fitted(self.method),
            },
            self.state_path,
        )

    def load_state(self) -> bool:
        if not self.state_path.exists():
            return False
        state = io.safe_torch_load(self.state_path, map_location=self.device)
        _check_state(state, self.state_path)
        self._check_same_run(self.state_path, state["config"], "was written by")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if margins.wanted(self.method):
            if not isinstance(state.get("margins"), dict):
                raise models.CheckpointError(f"{self.state_path} records no fitted margins (margins: auto); "
                                             "rerun with --force to start over")
            margins.apply(self.method, state["margins"])
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
        # Methods with their own update rule (SAM: two forward/backward passes) do it in train_step.
        terms = self.method.train_step(self.model, batch, self.optimizer)
        custom = terms is not None
        if not custom:
            terms = self.method.compute_loss(self.model, batch)
        total = terms["total"]
        if not torch.isfinite(total):
            raise NonFiniteError(
                f"loss is {float(total.detach())} at step {self.step} "
                f"({', '.join(f'{k}={float(torch.as_tensor(v).detach()):.4g}' for k, v in terms.items())})"
            )
        if not custom:
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
        return terms

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _check_same_run(self, path: Path, stored: object, verb: str) -> None:
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
                "--force to start over in this directory, or use a new --out"
            )

    def _check_final(self) -> None:
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
            self._check_same_run(self.final_path, meta.get("config"), "was trained with")
        if ck["arch"] != self.cfg["model"]["name"] or ck["num_classes"] != self.num_classes:
            raise models.CheckpointError(
                f"{self.final_path} holds {ck['arch']} with {ck['num_classes']} classes, this config trains "
                f"{self.cfg['model']['name']} with {self.num_classes}; rerun with --force, or use a new --out"
            )

    def run(self) -> int:
        # One greg process per run directory: a second one would replace this one's checkpoints.
        with io.dir_lock(self.out, "run directory"):
            return self._run_locked()

    def _run_locked(self) -> int:
        if self.force:
            for p in (self.final_path, self.state_path):  # this run's own outputs, replaced on request
                p.unlink(missing_ok=True)
        if self.final_path.exists():
            self._check_final()
            print(f"{self.final_path} exists: run already complete", file=sys.stderr)
            return 0
        # Temp files of a greg write that a SIGKILL interrupted are never outputs; don't let them pile up.
        # Only greg's own temp names, and only of writers that are gone (we hold the directory's lock).
        io.remove_stale_temp_files(self.out, locked=True)
        cfg_file = self.out / "config.yaml"
        if not self.load_state():
            io.atomic_write_text(cfg_file, config_text(self.cfg))
            self._trim_log_all()
            self._fit_margins()
        else:
            # runtime keys (workers, data root, cadence) may have changed: config.yaml shows this run's
            io.atomic_write_text(cfg_file, config_text(self.cfg))
            print(f"resuming {self.out} from step {self.step}/{self.total_steps}", file=sys.stderr)
            self._trim_log()

        c_data, c_train = self.cfg["data"], self.cfg["train"]
        bs, seed = c_data["batch_size"], self.cfg["seed"]
        id_iter = iter(
            loader(
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
            pool = None
            if c_data["aux_pool_per_epoch"] is not None:
                # One pass = one epoch, which draws its own pool (released: a fresh random.sample per epoch,
                # o4lc/Greg-OOD train_sea.py@4761101:157).
                per_pass, pool = self.steps_per_epoch * self.aux_bs, self.aux_pool
            aux_iter = iter(
                loader(
                    self.aux,
                    StreamSampler(
                        len(self.aux),
                        per_pass,
                        seed,
                        2,
                        self.step * self.aux_bs,
                        self.total_steps * self.aux_bs,
                        pool,
                    ),
                    self.aux_bs,
                    c_data["num_workers"],
                    self.device,
                )
            )

        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
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
                "detector": self.method.detector,
                "id_dataset": c_data["id"],
                "seed": self.cfg["seed"],
                "steps": self.step,
                "config": config_text(self.cfg),
                "config_hash": config_hash(self.cfg),
                "margins": margins.fitted(self.method),
            },
        )
        self._print_summary()
        return 0

    def _print_summary(self) -> None:
        """One closing line: steps, final loss, ID test accuracy (when the ID set has a test split), final.pt."""
        parts = [f"{self.step} steps"]
        loss = self.last_loss if self.last_loss is not None else self._logged_loss()
        if loss is not None:
            parts.append(f"final loss {loss:.4f}")
        c_data = self.cfg["data"]
        if "test" in data.spec(c_data["id"]).splits:
            test = data.load(c_data["id"], "test", c_data["root"])
            parts.append(f"ID test accuracy {100 * self._accuracy(test):.2f} % ({len(test)} images)")
        print(f"greg train: done: {', '.join(parts)}; {self.final_path}", file=sys.stderr)

    def _accuracy(self, ds) -> float:
        """Top-1 accuracy over the ID classes ((K+1)-class models never predict the extra class)."""
        k = data.spec(self.cfg["data"]["id"]).num_classes
        dl = torch.utils.data.DataLoader(ds, batch_size=2 * self.cfg["data"]["batch_size"],
                                         num_workers=self.cfg["data"]["num_workers"])
        correct = 0
        with eval_mode(self.model), torch.inference_mode():
            for x, y in dl:
                pred = self.model(x.to(self.device))[:, :k].argmax(dim=1).cpu()
                correct += int((pred == torch.as_tensor(y)).sum())
        return correct / max(len(ds), 1)

    def _logged_loss(self) -> float | None:
        """The last logged total loss (a resume that had no step left to run)."""
        if not self.log_path.exists():
            return None
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return json.loads(lines[-1]).get("total") if lines else None

    def _fit_margins(self) -> None:
        """``margins: auto``: m_in / m_out from the starting model's energies (greg.methods.margins)."""
        if not margins.wanted(self.method):
            return
        c_data = self.cfg["data"]
        if not self.cfg["init"]["checkpoint"]:
            raise ConfigError("method.hparams.margins: auto fits the margins to the starting model: set "
                              "init.checkpoint (a run from scratch has no model to fit them to)")
        id_eval = data.load(c_data["id"], "train", c_data["root"])  # eval transform: no augmentation
        aux_eval = data.load(c_data["aux"], "train", c_data["root"], id_dataset=c_data["id"])
        try:
            fitted = margins.fit_margins(
                self.model, id_eval, aux_eval, quantiles=tuple(self.method.hparams["margin_quantiles"]),
                seed=mix(self.cfg["seed"], 4), device=self.device,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        margins.apply(self.method, fitted)
        print(f"margins: auto: m_in = {fitted['m_in']:.4g}, m_out = {fitted['m_out']:.4g} (quantiles "
              f"{fitted['q_in']:g} / {fitted['q_out']:g} of {fitted['n_id']} ID / {fitted['n_aux']} auxiliary "
              "energies)", file=sys.stderr)

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
            self.last_loss = rec["total"]
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
        rec = {"grad_norm_id": score_input_grad_norm(self.model, batch["x_id"], score)}
        if "x_aux" in batch:
            rec["grad_norm_aux"] = score_input_grad_norm(self.model, batch["x_aux"], score)
            rec["score_grad_norm"] = 0.5 * (rec["grad_norm_id"] + rec["grad_norm_aux"])
        else:
            rec["score_grad_norm"] = rec["grad_norm_id"]
        return rec

    def _trim_log_all(self) -> None:
        """A fresh start: no log lines of an earlier attempt (one killed before its first checkpoint)."""
        self.log_path.unlink(missing_ok=True)  # idempotent: a missing log is the goal, not an error


