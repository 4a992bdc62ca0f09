"""The method-agnostic trainer behind ``greg train``.

A run is a pure function of its resolved config: data order and augmentation are derived from
``(seed, stream, epoch, index)`` (``greg.stream``), the learning rate from the step number, and every other
random state is checkpointed. A run killed at any point and restarted with the same command therefore ends
with the same weights as an uninterrupted one (on CPU; cuDNN nondeterminism aside on GPU).

The run directory's files (resume state, final checkpoint, log, identity) are :mod:`greg.rundir`'s; what a
method fits before step 0 and how it updates are the method's (:class:`greg.methods.Method`).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time

import torch
from tqdm.auto import tqdm

from greg import data, io, models
from greg.config import (
    SALT_AUX_STREAM,
    SALT_ID_STREAM,
    SALT_METHOD_SETUP,
    SALT_MODEL_INIT,
    ConfigError,
    make_method,
    mix,
)
from greg.device import eval_mode, resolve_device
from greg.diagnostics import score_grad_norms
from greg.errors import EXIT_PREEMPTED
from greg.optim.registry import lr_multiplier, make_optimizer
from greg.rundir import RunDir
from greg.stream import StreamSampler, aux_pool_size, loader, ratio_candidates


class NonFiniteError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- trainer


def eval_view(ds: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
    """The same images with the eval transform (no augmentation), without reading them again."""
    tf = getattr(ds, "transform", None)
    if not getattr(tf, "train", False):
        return ds
    view = copy.copy(ds)
    view.transform = copy.copy(tf)
    view.transform.train = False
    return view


def init_checkpoint_path(cfg: dict) -> str:
    """``init.checkpoint`` as a file: a released checkpoint of the data catalog (``greg data list``, role
    ``weights``) is looked up under ``data.root``, so the run's identity names the checkpoint, not where the
    data lives (moving ``data.root`` must not make it a different run)."""
    ref = cfg["init"]["checkpoint"]
    if ref in data.names("weights"):
        return str(data.weights_path(ref, cfg["data"]["root"]))
    return ref


class Trainer:
    """One run: model, data and optimizer of the config ``cfg``, trained in the run directory ``out``."""

    def __init__(self, cfg: dict, out: str | os.PathLike, device: str = "auto", force: bool = False):
        self.cfg = cfg
        self.rundir = RunDir(out, cfg)
        self.out = self.rundir.out
        self.force = force  # start over: discard this directory's final.pt / state.pt of another config
        self.device = resolve_device(device)
        c_data, c_train = cfg["data"], cfg["train"]
        self.method = make_method(cfg)
        spec = data.spec(c_data["id"])
        self.num_classes = spec.num_classes + self.method.extra_classes

        models.check_model_size(cfg["model"]["name"], self.num_classes, cfg["model"]["kwargs"],
                                "config key 'model.kwargs' and the class count")
        torch.manual_seed(mix(cfg["seed"], SALT_MODEL_INIT))
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
            self._load_aux()

        self.steps_per_epoch = len(self.id_train) // c_data["batch_size"]
        total = c_train["epochs"] * self.steps_per_epoch
        if c_train["max_steps"]:
            total = min(total, c_train["max_steps"]) if c_train["epochs"] > 0 else c_train["max_steps"]
        self.total_steps = total
        self.optimizer = make_optimizer(self.model.parameters(), cfg["optim"])
        self.step = 0
        self.last_loss: float | None = None  # total loss of the last step this process ran
        self._stop_signal: int | None = None

    def _load_aux(self) -> None:
        """The auxiliary set, its per-epoch pool and the candidates per step (``data.aux_batch_size``)."""
        c_data = self.cfg["data"]
        self.aux = data.load(c_data["aux"], "train", c_data["root"], id_dataset=c_data["id"], train=c_data["augment"])
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
                f"data.aux_batch_size is {self.aux_bs}{how}, but method {self.cfg['method']['name']!r} selects "
                f"{self.method.aux_needed()} auxiliary samples per step (method.hparams.n_selected): "
                "raise data.aux_batch_size or lower n_selected"
            )

    def _init_from(self, path: str, kind: str) -> None:
        raw = io.safe_torch_load(path)
        is_run = isinstance(raw, dict) and raw.get("format") == "greg-model-v1"
        # (K+1)-class methods (DOS, OpenMix) start from a K-class model with a fresh head.
        extra = self.method.extra_classes
        skip_head = bool(self.cfg["init"]["skip_head"])
        if kind == "run" or (kind == "auto" and is_run):
            if not is_run:
                raise ConfigError(f"init.checkpoint {path} is not a greg run checkpoint (final.pt)")
            models.check_described_model(models.read_checkpoint(path), path)
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

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_state(self) -> None:
        for name, p in self.model.state_dict().items():  # never replace the last good checkpoint with a broken one
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteError(f"parameter {name!r} became non-finite at step {self.step}")
        self.rundir.save_state(self.step, self.model, self.optimizer, self.method)

    def load_state(self) -> bool:
        step = self.rundir.load_state(self.model, self.optimizer, self.method, self.device, self.total_steps)
        if step is None:
            return False
        self.step = step
        return True

    def _setup_method(self) -> None:
        """A fresh start: the method fits what it needs from the starting model (:meth:`Method.setup`)."""
        try:
            note = self.method.setup(
                self.model, eval_view(self.id_train), None if self.aux is None else eval_view(self.aux),
                self.device, mix(self.cfg["seed"], SALT_METHOD_SETUP), from_scratch=not self.cfg["init"]["checkpoint"],
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if note:
            print(note, file=sys.stderr)

    # -- loop ----------------------------------------------------------------------------------------

    def _train_step(self, batch: dict) -> dict:
        terms = self.method.train_step(self.model, batch, self.optimizer)
        total = terms["total"]
        if not torch.isfinite(total):
            raise NonFiniteError(
                f"loss is {float(total.detach())} at step {self.step} "
                f"({', '.join(f'{k}={float(torch.as_tensor(v).detach()):.4g}' for k, v in terms.items())})"
            )
        return terms

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        with self.rundir.lock():
            return self._run_locked()

    def _run_locked(self) -> int:
        if self.force:
            self.rundir.discard()
        if self.rundir.final_path.exists():
            self.rundir.check_final(self.num_classes)
            print(f"{self.rundir.final_path} exists: run already complete", file=sys.stderr)
            return 0
        resumed = self.load_state()
        self.rundir.write_config()
        if not resumed:
            self.rundir.clear_log()
            self._setup_method()
        else:
            print(f"resuming {self.out} from step {self.step}/{self.total_steps}", file=sys.stderr)
            self.rundir.trim_log(self.step)

        id_iter, aux_iter = self._streams()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            with (
                self.rundir.open_log() as log,
                tqdm(
                    total=self.total_steps,
                    initial=self.step,
                    desc=f"train {self.cfg['method']['name']}",
                    disable=not self.cfg["train"]["progress"],
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
        self.rundir.save_final(self.model, self.num_classes, {
            "method": self.cfg["method"]["name"],
            "detector": self.method.detector,
            "extra_classes": self.method.extra_classes,
            "id_dataset": self.cfg["data"]["id"],
            "seed": self.cfg["seed"],
            "steps": self.step,
            "setup": self.method.setup_record(),
        })
        self._print_summary()
        return 0

    def _streams(self) -> tuple:
        """Iterators of ID batches and auxiliary batches (None without auxiliary data) from the current step."""
        c_data = self.cfg["data"]
        bs, seed = c_data["batch_size"], self.cfg["seed"]
        id_sampler = StreamSampler(
            len(self.id_train), self.steps_per_epoch * bs, seed, SALT_ID_STREAM, self.step * bs, self.total_steps * bs
        )
        id_iter = iter(loader(self.id_train, id_sampler, bs, c_data["num_workers"], self.device))
        if self.aux is None:
            return id_iter, None
        per_pass = max(len(self.aux) // self.aux_bs, 1) * self.aux_bs
        pool = None
        if c_data["aux_pool_per_epoch"] is not None:
            # One pass = one epoch, which draws its own pool (released: a fresh random.sample per epoch,
            # o4lc/Greg-OOD train_sea.py@4761101:157).
            per_pass, pool = self.steps_per_epoch * self.aux_bs, self.aux_pool
        aux_sampler = StreamSampler(
            len(self.aux), per_pass, seed, SALT_AUX_STREAM, self.step * self.aux_bs, self.total_steps * self.aux_bs, pool
        )
        return id_iter, iter(loader(self.aux, aux_sampler, self.aux_bs, c_data["num_workers"], self.device))

    def _print_summary(self) -> None:
        """One closing line: steps, final loss, ID test accuracy (when the ID set has a test split), final.pt."""
        parts = [f"{self.step} steps"]
        loss = self.last_loss if self.last_loss is not None else self.rundir.last_logged_loss()
        if loss is not None:
            parts.append(f"final loss {loss:.4f}")
        c_data = self.cfg["data"]
        if "test" in data.spec(c_data["id"]).splits:
            test = data.load(c_data["id"], "test", c_data["root"])
            parts.append(f"ID test accuracy {100 * self._accuracy(test):.2f} % ({len(test)} images)")
        print(f"greg train: done: {', '.join(parts)}; {self.rundir.final_path}", file=sys.stderr)

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
                rec.update(score_grad_norms(self.model, batch, c_train["grad_norm_score"]))
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
