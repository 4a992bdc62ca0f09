"""``greg evaluate``: score the ID test set and OOD test sets with detectors; write scores and metrics.

One process evaluates one checkpoint with one or more detectors (``--detector msp,energy,react``): the model
and the data sets are loaded once, ID training features are collected once for every detector fitted on
them, and each data set is read once for all detectors. Each evaluation writes its own directory, ``--out``
with ``{detector}`` replaced by the detector's name (required with several detectors). An evaluation whose
``metrics.csv`` exists with the same request in its ``meta.json`` (checkpoint digest, detector and its
arguments, data sets, subsample) is skipped, so a rerun after a crash does only what is missing.

Outputs in each evaluation's directory (each written atomically):

- ``scores/<set>.npz`` per set (``id.npz`` for the ID test set): ``scores`` (float32, higher = more OOD),
  ``index`` (indices into the full dataset after OOD subsampling); ``id.npz`` adds ``labels`` and ``pred``.
- ``metrics.csv``: one row per OOD set plus ``mean`` (mean over OOD sets; its ``n_ood`` is the total),
  columns :data:`COLUMNS`, metric values in **percent** with :data:`FLOAT_FORMAT`, so re-evaluating the
  same scores gives a byte-identical file (:func:`metrics_from_scores_dir`).
- ``meta.json``: detector and its arguments, metric conventions, seeds, checkpoint, data sets.
- with ``--robustness`` (first ``--robustness-n`` samples of each set; :mod:`greg.robustness`):
  ``robustness.csv`` (metrics under PGD, percent), ``certified.json`` (Eq. 4 summary, ``gamma`` from the
  whole ID test set) and ``scores/certified_radius.npz``.

An OOD set with fewer images than ``--n-ood`` is used whole, with a warning; ``meta.json`` keeps the
requested ``n_ood`` and records the number used per set in ``n_ood_used``.

Errors are one line ``greg evaluate: <message>`` (:func:`greg.errors.cli_errors`); exit status 2 for bad
input (arguments, a missing or corrupted data/checkpoint file), 1 for I/O failures (read-only or full
disk). The core is :func:`evaluate`, usable without files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import greg.data as gd
import greg.models as gm
from greg import io as gio
from greg import robustness as rb
from greg.config import SEED_MAX, ConfigError, check_kwargs, int_flag
from greg.detectors import DETECTORS, Detector
from greg.detectors import create as create_detector
from greg.detectors.base import FeatureDetector, collect_features
from greg.device import DEVICE_HELP, check_cuda, eval_mode, resolve_device
from greg.errors import EXIT_STATUS_HELP, InputError, cli_errors, json_object
from greg.metrics import METRIC_COLUMNS, metrics_table, ood_metrics  # noqa: F401  (re-exported)
from greg.metrics import TABLE_COLUMNS as COLUMNS  # noqa: F401  (re-exported: metrics.csv columns)

FLOAT_FORMAT = "%.4f"
CONVENTIONS = {
    "orientation": "scores: higher = more OOD",
    "units": "metrics.csv and robustness.csv in percent",
    "fpr95_idpos": "paper convention: ID positive; threshold accepting the ID recall closest to 95% "
    "(Outlier-Exposure/energy_ood fpr_and_fdr_at_recall); fraction of OOD accepted as ID",
    "fpr95_oodpos": "OpenOOD v1.5 / pytorch-ood: OOD positive; first threshold with >= 95% OOD recall; "
    "fraction of ID flagged as OOD",
    "auroc": "Mann-Whitney, ties count 1/2",
    "aupr_in": "average precision, ID positive",
    "aupr_out": "average precision, OOD positive",
    "mean_row": "unweighted mean over OOD sets; n_ood is the total",
}


# ----------------------------------------------------------------------------------------------- core
def score_detectors(
    model: nn.Module,
    loader: Iterable,
    detectors: Mapping[str, Detector],
    device: torch.device | str,
    *,
    with_predictions: bool = False,
    num_classes: int | None = None,
    desc: str = "score",
) -> dict[str, np.ndarray]:
    """One pass over ``loader``: each detector's float32 scores under its name; with ``with_predictions``
    also ``labels`` and ``pred`` (argmax over the first ``num_classes`` logits: (K+1)-class models never
    predict the extra class).

    Each detector runs under ``torch.inference_mode()`` unless it needs input gradients (then ``no_grad``
    outside the detector's own gradient step)."""
    if with_predictions and ("labels" in detectors or "pred" in detectors):
        raise ValueError("detector names 'labels' and 'pred' are reserved")
    found: dict[str, list[torch.Tensor]] = {name: [] for name in detectors}
    labels, preds = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            x = batch[0].to(device, non_blocking=True)
            for name, detector in detectors.items():
                with torch.no_grad() if detector.requires_grad else torch.inference_mode():
                    s = detector.score(model, x)
                if s.dim() != 1 or s.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{type(detector).__name__}.score returned shape {tuple(s.shape)} "
                                       f"for a batch of {x.shape[0]}")
                found[name].append(s.detach().float().cpu())
            if with_predictions:
                with torch.inference_mode():
                    preds.append(model(x)[:, :num_classes].argmax(dim=1).cpu())
            labels.append(torch.as_tensor(batch[1]).reshape(-1).long().cpu())
    if not labels:
        raise ValueError(f"{desc}: the loader yielded no batches")
    out = {name: torch.cat(v).numpy() for name, v in found.items()}
    if with_predictions:
        out["labels"] = torch.cat(labels).numpy()
        out["pred"] = torch.cat(preds).numpy()
    return out


def fit_detectors(
    detectors: Sequence[Detector], model: nn.Module, fit_loader: Iterable, device: torch.device | str
) -> None:
    """Fit every detector that ``needs_fit`` on ``fit_loader`` (ID training data). Detectors fitted on
    penultimate features share one collection (up to the largest ``max_fit_samples`` asked; each gets its
    own first ``max_fit_samples``, the same rows its own ``fit`` would collect)."""
    feature_dets = [d for d in detectors if d.needs_fit and isinstance(d, FeatureDetector)]
    if feature_dets:
        limits = [d.max_fit_samples for d in feature_dets]
        h, y = collect_features(model, fit_loader, device,
                                max_samples=None if None in limits else max(limits))
        for d in feature_dets:
            n = d.max_fit_samples
            d.fit_features(model, h if n is None else h[:n], y if n is None else y[:n])
    for d in detectors:
        if d.needs_fit and not isinstance(d, FeatureDetector):
            d.fit(model, fit_loader, device)


def format_csv(df: pd.DataFrame) -> str:
    """The fixed CSV text of a metrics table (``\\n`` line ends, :data:`FLOAT_FORMAT`)."""
    return df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n", na_rep="nan")


def evaluate(
    model: nn.Module,
    id_loader: Iterable,
    ood_loaders: Mapping[str, Iterable],
    detector: Detector | str,
    device: torch.device | str,
    *,
    fit_loader: Iterable | None = None,
    num_classes: int | None = None,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Score the ID loader and each OOD loader; returns ``(scores, metrics_df)``.

    ``scores`` maps ``"id"`` and each OOD name to float32 score arrays; ``metrics_df`` is
    :func:`metrics_table` (percent). ``detector`` may be a registered name. Detectors with ``needs_fit``
    are fitted on ``fit_loader`` (ID training data) when it is given; otherwise they must be fitted."""
    if isinstance(detector, str):
        detector = create_detector(detector)
    model = model.to(device)
    if fit_loader is not None:
        fit_detectors([detector], model, fit_loader, device)
    outs, dfs = evaluate_many(model, id_loader, ood_loaders, {"d": detector}, device, num_classes=num_classes)
    return {k: v["d"] for k, v in outs.items()}, dfs["d"]


def evaluate_many(
    model: nn.Module,
    id_loader: Iterable,
    ood_loaders: Mapping[str, Iterable],
    detectors: Mapping[str, Detector],
    device: torch.device | str,
    *,
    num_classes: int | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, pd.DataFrame]]:
    """The evaluation loop: every (fitted) detector on the ID loader and each OOD loader, one pass per
    loader. Returns ``{set: score_detectors(...)}`` (``"id"`` with ``labels`` / ``pred``) and
    ``{detector name: metrics_table}``."""
    if "id" in ood_loaders:
        raise ValueError("an OOD set cannot be named 'id' (reserved for the ID test set)")
    outs = {"id": score_detectors(model, id_loader, detectors, device, with_predictions=True,
                                  num_classes=num_classes, desc="id")}
    for name, loader in ood_loaders.items():
        outs[name] = score_detectors(model, loader, detectors, device, desc=name)
    acc = _id_accuracy(outs["id"])
    dfs = {d: metrics_table(outs["id"][d], {k: v[d] for k, v in outs.items() if k != "id"}, acc)
           for d in detectors}
    return outs, dfs


def _id_accuracy(id_out: Mapping[str, np.ndarray]) -> float | None:
    labels, pred = id_out["labels"], id_out["pred"]
    known = labels >= 0
    if not known.any():
        return None
    return float(np.mean(pred[known] == labels[known]))


def metrics_from_scores_dir(scores_dir: str | Path, ood_sets: list[str]) -> pd.DataFrame:
    """Recompute :func:`metrics_table` from ``scores/<set>.npz`` files written by ``greg evaluate``."""
    scores_dir = Path(scores_dir)

    def read(name: str) -> dict[str, np.ndarray]:
        path = scores_dir / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"score file not found: {path}")
        with np.load(path) as z:
            if "scores" not in z:
                raise KeyError(f"{path}: no 'scores' array (found {sorted(z.files)})")
            return {k: z[k] for k in z.files}

    id_z = read("id")
    acc = _id_accuracy(id_z) if "labels" in id_z and "pred" in id_z else None
    return metrics_table(id_z["scores"], {n: read(n)["scores"] for n in ood_sets}, acc)


def save_scores(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with gio.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXIT_STATUS_HELP
    p.add_argument(
        "--checkpoint", required=True, help="greg run checkpoint (final.pt) or, with --arch, external weights"
    )
    p.add_argument("--id", required=True, help="ID dataset name (e.g. cifar10, tiny)")
    p.add_argument("--ood", required=True, help="comma-separated OOD dataset names")
    p.add_argument("--detector", required=True,
                   help=f"comma-separated detector names, each one of: {', '.join(DETECTORS.names())}")
    p.add_argument("--out", required=True,
                   help="output directory; '{detector}' in it is replaced by each detector's name (required "
                        "with several detectors)")
    p.add_argument("--root", default="data", help="data root (default: data)")
    p.add_argument("--n-ood", type=int_flag(0), default=10000, help="subsample each OOD set to at most N (0 = all)")
    p.add_argument("--subsample-seed", type=int_flag(0, SEED_MAX), default=0,
                   help="seed of the --n-ood subsample (the same seed picks the same images for every model)")
    p.add_argument("--batch-size", type=int_flag(1), default=256, help="images per scoring batch (no effect on scores)")
    p.add_argument("--num-workers", type=int_flag(0), default=0, help="data-loader worker processes (0 = main process)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--require-cuda", action="store_true",
                   help="fail (exit 1) instead of warning when CUDA is unavailable (workflow GPU jobs)")
    p.add_argument("--arch", default=None, help="external checkpoint: architecture name (greg.models)")
    p.add_argument("--num-classes", type=int, default=None, help="external checkpoint: number of outputs")
    p.add_argument("--model-kwargs", default="{}", help="external checkpoint: JSON object of model arguments")
    p.add_argument(
        "--detector-kwargs",
        default="{}",
        help="JSON object of detector arguments, e.g. '{\"percentile\": 90}'; with several detectors, an "
        "object of such objects keyed by detector name, e.g. '{\"react\": {\"percentile\": 90}}'",
    )
    p.add_argument(
        "--fit-max-samples", type=int, default=None, help="use at most N ID training images to fit"
    )
    p.add_argument("--robustness", action="store_true", help="also certified radii (Eq. 4) and PGD attack")
    p.add_argument(
        "--robustness-n", type=int, default=1000, help="first N samples of each set for robustness"
    )
    p.add_argument("--attack-norm", choices=("linf", "l2"), default="linf", help="norm of the PGD attack's ball")
    p.add_argument("--attack-eps", type=float, default=0.01, help="PGD radius on the normalized input")
    p.add_argument("--attack-alpha", type=float, default=0.0025, help="PGD step size")
    p.add_argument("--attack-steps", type=int, default=10, help="PGD iterations")
    p.add_argument("--cert-norm", choices=("l2", "linf"), default="l2",
                   help="norm of the certified radius (Eq. 4)")
    p.add_argument("--cert-eps", type=float, default=0.5, help="cap of the certified radius")


def _build_detector(name: str, kwargs: dict[str, Any], context: Mapping[str, Any]) -> Detector:
    """The detector ``name`` with ``kwargs``, its ``context_kwargs`` filled from ``context`` when not given."""
    cls = DETECTORS.get(name)
    _check_kwargs(kwargs, cls, f"--detector-kwargs: detector {name!r}")
    return create_detector(name, **{**{k: context[k] for k in cls.context_kwargs}, **kwargs})


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    if args.arch is not None:
        if args.num_classes is None:
            raise InputError("--arch needs --num-classes for an external checkpoint")
        kwargs = json_object(args.model_kwargs, "--model-kwargs")
        _check_kwargs(kwargs, gm.MODELS.get(args.arch), f"--model-kwargs: model {args.arch!r}", ("num_classes",))
        gm.check_model_size(args.arch, args.num_classes, kwargs, "--model-kwargs and --num-classes")
        model = gm.create(args.arch, args.num_classes, **kwargs)
        gm.load_pretrained(model, args.checkpoint)
        meta = {"external": True, "arch": args.arch, "num_classes": args.num_classes, "model_kwargs": kwargs}
        return model.to(device), meta
    return gm.load_checkpoint(args.checkpoint, device)


def _check_kwargs(kwargs: dict[str, Any], fn: Any, what: str, exclude: tuple[str, ...] = ()) -> None:
    try:
        check_kwargs(kwargs, fn, what, exclude)
    except ConfigError as e:
        raise InputError(str(e)) from None


def _loader(ds: Any, args: argparse.Namespace, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )


def _indices(ds: Any) -> np.ndarray:
    idx = getattr(ds, "indices", None)
    return np.asarray(idx if idx is not None else range(len(ds)), dtype=np.int64)


def _first_n(ds: Any, n: int) -> Any:
    return ds if len(ds) <= n else torch.utils.data.Subset(ds, list(range(n)))


@dataclass
class Evaluation:
    """One detector's evaluation of the checkpoint: its detector, output directory and request (what
    ``meta.json`` records to recognize a finished evaluation of the same inputs)."""

    name: str
    detector: Detector
    out: Path
    request: dict[str, Any] = field(default_factory=dict)

    def done(self) -> bool:
        try:
            meta = json.loads((self.out / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (self.out / "metrics.csv").is_file() and meta.get("request") == self.request


@cli_errors("greg evaluate")
def run(args: argparse.Namespace) -> int:
    # The arguments are checked before any --out is created and locked: a mistyped command leaves nothing.
    device, ood_names, id_spec, evals = _check_args(args)
    digest = _sha256(args.checkpoint)
    for ev in evals:
        ev.request = _request(args, ev, ood_names, digest)
    # One greg process per output directory: two would interleave their scores and metrics.
    with contextlib.ExitStack() as stack:
        for ev in evals:
            stack.enter_context(gio.dir_lock(ev.out, "output directory"))
        todo = [ev for ev in evals if not ev.done()]
        for ev in evals:
            if ev not in todo:
                print(f"greg evaluate: {ev.out / 'metrics.csv'} exists for this request: skipped", file=sys.stderr)
        if todo:
            _run(args, device, ood_names, id_spec, todo)
    return 0


def _check_args(args: argparse.Namespace) -> tuple[torch.device, list[str], Any, list[Evaluation]]:
    """Everything about the command that needs no model: device, OOD names, detectors, checkpoint file."""
    check_cuda(args.device, args.require_cuda, "greg evaluate")
    device = resolve_device(args.device)
    ood_names = _names(args.ood, "--ood")
    if "id" in ood_names:
        raise InputError(f"--ood names must be unique and not 'id': {ood_names}")
    id_spec = gd.spec(args.id)
    for name in ood_names:
        # the ID test set scored as OOD gives AUROC 50 and looks like a result
        if name == args.id:
            raise InputError(f"--ood {name}: that is the ID set (--id {args.id}); OOD sets must be other data")
        if gd.spec(name).role not in ("ood", "id"):
            raise InputError(f"--ood {name}: a {gd.spec(name).role!r} dataset, not an evaluation set; OOD sets: "
                             + ", ".join(n for n in gd.DATASETS.names() if gd.spec(n).role == "ood"))
        if gd.spec(name).role == "id":  # near-OOD (CIFAR-100 vs CIFAR-10) is a real protocol, but say so
            print(f"greg evaluate: warning: --ood {name} is an ID dataset (its test split), scored as near-OOD",
                  file=sys.stderr)
    evals = _evaluations(args, id_spec)
    if args.robustness:
        for ev in evals:
            if ev.detector.requires_grad:
                raise InputError(f"--robustness needs a differentiable detector; {ev.name} perturbs its input")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    return device, ood_names, id_spec, evals


def _names(text: str, flag: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError(f"{flag} needs at least one name")
    if len(set(names)) != len(names):
        raise InputError(f"{flag} names must be unique: {names}")
    return names


def _evaluations(args: argparse.Namespace, id_spec: Any) -> list[Evaluation]:
    """One :class:`Evaluation` per ``--detector`` name, with its kwargs and output directory."""
    names = _names(args.detector, "--detector")
    for name in names:
        DETECTORS.get(name)  # unknown name: KeyError listing the known ones
    kwargs = json_object(args.detector_kwargs, "--detector-kwargs")
    if len(names) > 1:
        if "{detector}" not in args.out:
            raise InputError(f"--out {args.out}: with several detectors it must contain '{{detector}}' (replaced "
                             "by each detector's name)")
        for key, value in kwargs.items():
            if key not in names or not isinstance(value, dict):
                raise InputError(f"--detector-kwargs: with several detectors, an object of objects keyed by "
                                 f"detector name ({', '.join(names)}); got key {key!r}")
    per = {n: kwargs.get(n, {}) for n in names} if len(names) > 1 else {names[0]: kwargs}
    context = {"std": list(id_spec.std), "max_fit_samples": args.fit_max_samples}
    return [Evaluation(n, _build_detector(n, per[n], context), Path(args.out.replace("{detector}", n)))
            for n in names]


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _request(args: argparse.Namespace, ev: Evaluation, ood_names: list[str], digest: str) -> dict[str, Any]:
    """What makes an evaluation's results: same request, same files (runtime flags such as the device,
    batch size or workers do not change the scores)."""
    keys = ("id", "n_ood", "subsample_seed", "arch", "num_classes", "model_kwargs", "robustness")
    if args.robustness:
        keys += ("robustness_n", "attack_norm", "attack_eps", "attack_alpha", "attack_steps", "cert_norm",
                 "cert_eps")
    return {"checkpoint_sha256": digest, "detector": ev.name, "detector_hparams": ev.detector.hparams(),
            "fit_max_samples": args.fit_max_samples if ev.detector.needs_fit else None, "ood": ood_names,
            **{k: getattr(args, k) for k in keys}}


def _check_outputs(args: argparse.Namespace, model: nn.Module, ckpt_meta: Any, k: int,
                   evals: list[Evaluation]) -> None:
    """The model's outputs: the ID classes plus the checkpoint's extra classes, and every detector's
    ``extra_outputs`` present."""
    n_out = int(model.head.out_features)
    for ev in evals:
        # a detector reading the (K+1)-th logit would score garbage on a K-class model
        if ev.detector.extra_outputs and n_out != k + ev.detector.extra_outputs:
            raise InputError(f"{ev.name} needs a (K+{ev.detector.extra_outputs})-class model: {args.checkpoint} "
                             f"has {n_out} outputs, {args.id} has K={k} classes")
    meta = ckpt_meta if isinstance(ckpt_meta, dict) else {}
    extra = meta.get("extra_classes")
    if not isinstance(extra, int) or isinstance(extra, bool):
        # run checkpoints written before the meta recorded it had 0 or 1 extra class; external weights
        # have what the detectors read
        wanted = max(ev.detector.extra_outputs for ev in evals)
        extra = n_out - k if isinstance(meta.get("method"), str) and n_out - k in (0, 1) else wanted
    if n_out != k + extra:
        what = f"K={k}" if extra == 0 else f"K+1={k + 1} (a (K+1)-class model)"
        raise InputError(
            f"{args.checkpoint}: model has {n_out} outputs but {args.id} has {k} classes: expected {what}"
            + ("" if extra else "; a (K+1)-class model is evaluated with "
               + " or ".join(n for n in DETECTORS.names() if DETECTORS.get(n).extra_outputs))
        )


def _run(args: argparse.Namespace, device: torch.device, ood_names: list[str], id_spec: Any,
         evals: list[Evaluation]) -> None:
    model, ckpt_meta = _load_model(args, device)
    model.eval()
    _check_outputs(args, model, ckpt_meta, id_spec.num_classes, evals)
    id_ds = gd.load(args.id, "test", args.root)
    ood_ds = _ood_sets(args, ood_names)
    dets = {ev.name: ev.detector for ev in evals}
    if any(d.needs_fit for d in dets.values()):
        fit_detectors(list(dets.values()), model, _loader(gd.load(args.id, "train", args.root), args, device),
                      device)
    outs, dfs = evaluate_many(model, _loader(id_ds, args, device),
                              {n: _loader(ds, args, device) for n, ds in ood_ds.items()}, dets, device,
                              num_classes=id_spec.num_classes)
    for ev in evals:
        id_out = {"scores": outs["id"][ev.name], "labels": outs["id"]["labels"], "pred": outs["id"]["pred"]}
        save_scores(ev.out / "scores" / "id.npz", {**id_out, "index": _indices(id_ds)})
        for name, ds in ood_ds.items():
            save_scores(ev.out / "scores" / f"{name}.npz", {"scores": outs[name][ev.name], "index": _indices(ds)})
        meta = {
            "detector": ev.name,
            "detector_hparams": ev.detector.hparams(),
            "conventions": CONVENTIONS,
            "checkpoint": str(args.checkpoint),
            "checkpoint_meta": ckpt_meta if _json_ok(ckpt_meta) else str(ckpt_meta),
            "arch": args.arch,
            "id": args.id,
            "ood": ood_names,
            "n_ood": args.n_ood,
            "n_ood_used": {name: len(ds) for name, ds in ood_ds.items()},
            "subsample_seed": args.subsample_seed,
            "fit_max_samples": args.fit_max_samples if ev.detector.needs_fit else None,
            "device": str(device),
            "files": {"metrics": "metrics.csv", "scores": "scores/<set>.npz"},
            "request": ev.request,
        }
        if args.robustness:
            meta["robustness"] = _run_robustness(args, model, ev.detector, device, id_ds, ood_ds, id_out, ev.out)
        gio.atomic_write_json(ev.out / "meta.json", meta)
        # metrics.csv last: its presence means the evaluation finished.
        gio.atomic_write_text(ev.out / "metrics.csv", format_csv(dfs[ev.name]))
        if len(evals) > 1:
            print(f"{ev.name}:", file=sys.stderr)
        print(dfs[ev.name].to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=sys.stderr)


def _ood_sets(args: argparse.Namespace, ood_names: list[str]) -> dict[str, Any]:
    """Each OOD set's test split (or its only split), subsampled to ``--n-ood``."""
    n_max = args.n_ood if args.n_ood and args.n_ood > 0 else None
    ood_ds = {}
    for name in ood_names:
        s = gd.spec(name)
        split = "test" if "test" in s.splits else s.splits[0]
        ood_ds[name] = gd.load(
            name, split, args.root, id_dataset=args.id, n_max=n_max, subsample_seed=args.subsample_seed
        )
        if n_max is not None and len(ood_ds[name]) < n_max:
            print(
                f"greg evaluate: warning: OOD set {name!r} has {len(ood_ds[name])} images, fewer than "
                f"--n-ood {n_max}; using all {len(ood_ds[name])}",
                file=sys.stderr,
            )
    return ood_ds


def _json_ok(obj: Any) -> bool:
    try:
        json.dumps(obj)
        return True
    except TypeError:
        return False


def _run_robustness(
    args: argparse.Namespace,
    model: nn.Module,
    detector: Detector,
    device: torch.device,
    id_ds: Any,
    ood_ds: Mapping[str, Any],
    id_out: Mapping[str, np.ndarray],
    out: Path,
) -> dict[str, Any]:
    score_fn = rb.detector_score_fn(detector, model)
    n = args.robustness_n
    id_loader = _loader(_first_n(id_ds, n), args, device)
    radii, summary = rb.certify(
        score_fn,
        id_loader,
        device,
        eps=args.cert_eps,
        norm=args.cert_norm,
        scores_id=id_out["scores"],  # gamma: 95 % TPR threshold of the whole ID test set
    )
    save_scores(out / "scores" / "certified_radius.npz", {"radius": radii})
    gio.atomic_write_json(out / "certified.json", summary)
    _, df = rb.attack_metrics(
        score_fn,
        id_loader,
        {k: _loader(_first_n(v, n), args, device) for k, v in ood_ds.items()},
        device,
        eps=args.attack_eps,
        alpha=args.attack_alpha,
        steps=args.attack_steps,
        norm=args.attack_norm,
        scale=100.0,
    )
    gio.atomic_write_text(out / "robustness.csv", format_csv(df))
    return {
        "certified": summary,
        "attack": {
            "norm": args.attack_norm,
            "eps": args.attack_eps,
            "alpha": args.attack_alpha,
            "steps": args.attack_steps,
            "n": n,
        },
    }
