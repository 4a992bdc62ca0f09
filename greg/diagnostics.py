"""Diagnostics: the input-gradient norm of a score (paper Fig. 3), and the SAM appendix's
(docs/METHOD.md#sam-only-norm): per-sample classifier-layer gradient norm and maximum logit, ID vs each OOD
set, and score distributions before/after fine-tuning.

Per-sample head gradient norm: for a sample with penultimate features ``h`` and logits ``f = W h + b``, the
cross-entropy against the *predicted* label ``y_hat = argmax f`` (no ground truth needed, so it applies to
OOD data) has ``dL/dW = (p - e_yhat) h^T`` with ``p = softmax(f)``, hence

    ||dL/dW||_F = ||p - e_yhat||_2 * ||h||_2        (closed form, ``nn.Linear`` heads)

and ``||dL/db|| = ||p - e_yhat||``. Any other head falls back to ``torch.func.vmap(grad(...))`` (``mode =
"autograd"``); tests check both agree. These are raw diagnostics, not outlier scores: no orientation flip.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from greg import data, io, models, scores
from greg.device import eval_mode, rows_per_chunk

DIAGNOSTICS = ("head_grad_norm", "max_logit", "energy", "msp")


#: Pixels per chunk of :func:`score_input_grad_rows` (2^19): 512 rows at 32 x 32, 10 at 224 x 224, where
#: the 1584 candidates of an ImageNet GReg+ step in one graph took over 50 GB.
GRAD_PIXELS = 2**19


def score_input_grad_rows(
    model: nn.Module, x: torch.Tensor, score: str = "energy", max_rows: int | None = None
) -> torch.Tensor:
    """``||d S(x_i) / d x_i||_2`` per row of ``x``, in eval mode (what GReg's gradient term penalizes).

    Eval mode makes the rows independent, so one backward of ``sum_i S(x_i)`` over a chunk of rows gives each
    row's gradient; chunks of at most ``max_rows`` rows and :data:`GRAD_PIXELS` pixels bound the memory. Only
    the input gradient is computed: no parameter ``.grad`` is touched. The model's modes are restored.
    """
    score_fn = scores.get(score)
    norms = []
    with eval_mode(model), torch.enable_grad():
        for chunk in torch.split(x, rows_per_chunk(x, GRAD_PIXELS, max_rows)):
            xl = chunk.detach().clone().requires_grad_(True)
            s = score_fn(model(xl))
            (g,) = torch.autograd.grad(s.sum(), xl, allow_unused=True)
            if g is None:
                norms.append(torch.zeros(chunk.shape[0], device=x.device))
            else:
                norms.append(torch.linalg.vector_norm(g.flatten(1), ord=2, dim=1).detach())
    return torch.cat(norms) if norms else torch.zeros(0, device=x.device)


def score_input_grad_norm(
    model: nn.Module, x: torch.Tensor, score: str = "energy", max_rows: int | None = None
) -> float:
    """Mean over rows of :func:`score_input_grad_rows` (paper Fig. 3 diagnostic)."""
    return score_input_grad_rows(model, x, score, max_rows).mean().item()


def score_grad_norms(model: nn.Module, batch: Mapping[str, torch.Tensor], score: str) -> dict[str, float]:
    """:func:`score_input_grad_norm` of a training step's ID batch and auxiliary batch (when there is one)
    and ``score_grad_norm``, their mean (the trainer logs these every ``train.grad_norm_every`` steps). At
    most an ID batch of rows goes through one graph: the auxiliary batch may hold GReg+'s / POEM's candidates
    (384-1584), and this diagnostic must not need more memory than the training step."""
    rows = int(batch["x_id"].shape[0])
    rec = {"grad_norm_id": score_input_grad_norm(model, batch["x_id"], score, rows)}
    if "x_aux" in batch:
        rec["grad_norm_aux"] = score_input_grad_norm(model, batch["x_aux"], score, rows)
        rec["score_grad_norm"] = 0.5 * (rec["grad_norm_id"] + rec["grad_norm_aux"])
    else:
        rec["score_grad_norm"] = rec["grad_norm_id"]
    return rec


def _head_params(head: nn.Module, include_bias: bool) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in head.named_parameters()}
    if not include_bias:
        params = {k: v for k, v in params.items() if not k.endswith("bias")}
    if not params:
        raise ValueError(f"head {type(head).__name__} has no parameters to take the gradient of")
    return params


def head_grad_norm_closed_form(head: nn.Linear, h: torch.Tensor, include_bias: bool = False) -> torch.Tensor:
    """``||p - e_yhat|| * ||h||`` (``* sqrt(||h||^2 + 1)`` with the bias) per row of ``h``."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the closed form needs an nn.Linear head, got {type(head).__name__}")
    with torch.no_grad():
        return _closed_form(head, h, include_bias)


def _closed_form(head: nn.Linear, h: torch.Tensor, include_bias: bool) -> torch.Tensor:
    logits = head(h)
    p = torch.softmax(logits, dim=1)
    r = p - F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(p.dtype)
    hn2 = h.pow(2).sum(dim=1)
    if include_bias and head.bias is not None:
        hn2 = hn2 + 1.0
    return torch.linalg.vector_norm(r, dim=1) * hn2.sqrt()


def head_grad_norm_autograd(head: nn.Module, h: torch.Tensor, include_bias: bool = False) -> torch.Tensor:
    """Per-sample ``||d CE(head(h_i), argmax head(h_i)) / d theta_head||`` by ``torch.func.vmap(grad)``."""
    from torch.func import functional_call, grad, vmap

    params = _head_params(head, include_bias)
    frozen = {k: v.detach() for k, v in head.named_parameters() if k not in params}

    def loss(p: dict[str, torch.Tensor], hi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, {**frozen, **p}, (hi[None],))
        return F.cross_entropy(logits, logits.detach().argmax(dim=1))

    g = vmap(grad(loss), in_dims=(None, 0))(params, h.detach())
    return torch.sqrt(sum(v.flatten(1).pow(2).sum(dim=1) for v in g.values()))


def head_grad_norm(
    model: nn.Module, h: torch.Tensor, mode: str = "auto", include_bias: bool = False
) -> torch.Tensor:
    """Per-sample head gradient norm from features ``h``; ``mode``: auto | closed_form | autograd."""
    if mode == "auto":
        mode = "closed_form" if isinstance(model.head, nn.Linear) else "autograd"
    if mode == "closed_form":
        return head_grad_norm_closed_form(model.head, h, include_bias)
    if mode == "autograd":
        return head_grad_norm_autograd(model.head, h, include_bias)
    raise ValueError(f"head_grad_norm mode must be auto, closed_form or autograd, got {mode!r}")


@torch.no_grad()
def _batch_diagnostics(
    model: nn.Module, x: torch.Tensor, mode: str, include_bias: bool
) -> dict[str, torch.Tensor]:
    h = model.features(x)
    logits = model.head(h)
    with torch.enable_grad():
        gn = head_grad_norm(model, h, mode, include_bias)
    return {
        "head_grad_norm": gn.detach(),
        "max_logit": logits.amax(dim=1),
        "energy": scores.energy(logits),
        "msp": torch.softmax(logits, dim=1).amax(dim=1),
    }


def collect(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    mode: str = "auto",
    include_bias: bool = False,
    max_batches: int | None = None,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample diagnostics over ``loader`` (batches ``x`` or ``(x, y, ...)``), model in eval mode.

    Returns ``{"head_grad_norm", "max_logit" (raw, higher = more confident), "energy" (``-logsumexp``),
    "msp" (raw max softmax)}``, each a float64 array with one entry per sample.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    out: dict[str, list[np.ndarray]] = {k: [] for k in DIAGNOSTICS}
    with eval_mode(model):
        for i, batch in enumerate(tqdm(loader, desc=progress or "diagnostics", disable=progress is None)):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for k, v in _batch_diagnostics(model, x.to(device), mode, include_bias).items():
                out[k].append(v.double().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def collect_sets(
    model: nn.Module, loaders: Mapping[str, Iterable], device: torch.device | str, **kwargs
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`collect` for each named set (``{"id": loader, "textures": loader, ...}``)."""
    return {name: collect(model, loader, device, **kwargs) for name, loader in loaders.items()}


def collect_checkpoint(
    checkpoint: str | os.PathLike,
    id_dataset: str,
    ood_sets: Iterable[str],
    root: str | os.PathLike,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 256,
    max_samples: int | None = 10000,
    seed: int = 0,
    num_workers: int = 0,
    **kwargs,
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`collect_sets` for a run checkpoint on the ID test split (key ``"id"``) and each OOD set's test
    split, each subsampled to ``max_samples`` with ``greg.data.subsample(seed)`` (the evaluation protocol)."""
    from torch.utils.data import DataLoader

    model, _ = models.load_checkpoint(checkpoint, device)
    sets = {"id": data.load(id_dataset, "test", root)}
    for name in ood_sets:
        sets[name] = data.load(name, "test", root, id_dataset=id_dataset)
    loaders = {}
    for name, ds in sets.items():
        if max_samples is not None:
            ds = data.subsample(ds, max_samples, seed)
        loaders[name] = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return {name: collect(model, ld, device, progress=name, **kwargs) for name, ld in loaders.items()}


def score_input_grad_norms(
    model: nn.Module, loader: Iterable, device: torch.device | str, score: str = "energy"
) -> np.ndarray:
    """:func:`score_input_grad_rows` of every sample of ``loader`` (batches ``x`` or ``(x, y, ...)``)."""
    out = [
        score_input_grad_rows(model, (b[0] if isinstance(b, (tuple, list)) else b).to(device), score)
        .double().cpu().numpy()
        for b in loader
    ]
    return np.concatenate(out) if out else np.zeros(0)


def grad_norms_checkpoint(
    checkpoint: str | os.PathLike,
    sets: Mapping[str, tuple[str, str]],
    id_dataset: str,
    root: str | os.PathLike,
    device: torch.device | str = "cpu",
    *,
    score: str = "energy",
    batch_size: int = 256,
    max_samples: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of :func:`score_input_grad_norms` per set for one checkpoint: ``sets`` maps a label to a
    ``(dataset, split)``, each normalized for ``id_dataset`` and subsampled to ``max_samples`` with
    ``greg.data.subsample(seed)`` (the evaluation protocol)."""
    from torch.utils.data import DataLoader

    model, _ = models.load_checkpoint(checkpoint, device)
    out = {}
    for label, (name, split) in sets.items():
        ds = data.load(name, split, root, id_dataset=id_dataset)
        if max_samples is not None:
            ds = data.subsample(ds, max_samples, seed)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
        out[label] = float(score_input_grad_norms(model, loader, device, score).mean())
    return out


GRAD_NORM_COLUMNS = ("model", "set", "role", "n_seeds", "mean", "std")
_ROLE_TICK = {"id": "ID test", "aux": "auxiliary", "ood": "OOD"}


def grad_norm_rows(per_model: Mapping[str, list[Mapping[str, float]]], roles: Mapping[str, str]) -> list[dict]:
    """``{model: [per-checkpoint {set: mean norm}, ...]}`` -> rows of :data:`GRAD_NORM_COLUMNS`: mean and
    sample std (ddof 1; 0 for one checkpoint) over the model's checkpoints (seeds), per set; ``roles`` maps
    each set to ``id`` / ``aux`` / ``ood``."""
    rows = []
    for model, runs in per_model.items():
        for name in runs[0]:
            v = np.array([r[name] for r in runs], dtype=np.float64)
            std = float(v.std(ddof=1)) if v.size > 1 else 0.0
            rows.append({"model": model, "set": name, "role": roles[name], "n_seeds": int(v.size),
                         "mean": float(v.mean()), "std": std})
    return rows


def format_grad_norm_csv(rows: list[Mapping]) -> str:
    """:func:`grad_norm_rows` as CSV text (``\\n`` line ends, 4 decimals: a rerun gives the same bytes)."""
    import csv
    import io as _io

    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(GRAD_NORM_COLUMNS)
    w.writerows([r["model"], r["set"], r["role"], r["n_seeds"], f"{r['mean']:.4f}", f"{r['std']:.4f}"]
                for r in rows)
    return buf.getvalue()


def plot_grad_norms(rows: list[Mapping], path: str | os.PathLike, score: str = "energy") -> list[Path]:
    """Grouped bars: one group per set, one bar per model, height the mean over seeds, whisker one std."""
    from matplotlib.figure import Figure

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    by = {(r["model"], r["set"]): r for r in rows}
    n_seeds = "/".join(map(str, sorted({int(r["n_seeds"]) for r in rows})))
    width = 0.8 / len(models_)
    fig = Figure(figsize=(1.1 * len(sets) + 2.0, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, m in enumerate(models_):
        xs = [j + (i - (len(models_) - 1) / 2) * width for j in range(len(sets))]
        ax.bar(xs, [by[m, s]["mean"] for s in sets], width, yerr=[by[m, s]["std"] for s in sets], capsize=2,
               label=m)
    ticks = [f"{s}\n({_ROLE_TICK[by[models_[0], s]['role']]})" for s in sets]
    ax.set_xticks(range(len(sets)), ticks, fontsize="small")
    ax.set_ylabel(rf"mean $\|\nabla_x S(x)\|_2$, $S$ = {score}")
    ax.set_title(f"input-gradient norm of the {score} score per set (mean ± std over {n_seeds} seeds)",
                 fontsize="medium")
    ax.legend(fontsize="small")
    return _save_figure(fig, Path(path))


def save_npz(path: str | os.PathLike, diagnostics: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """One ``.npz`` with arrays named ``<set>/<diagnostic>`` (atomic)."""
    arrays = {f"{s}/{k}": np.asarray(v) for s, d in diagnostics.items() for k, v in d.items()}
    with io.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _save_figure(fig, path: Path) -> list[Path]:
    written = []
    for ext in ("pdf", "png"):
        target = path.with_suffix(f".{ext}")
        with io.atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        written.append(target)
    return written


def plot_distributions(
    panels: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    xlabel: str = "score",
    bins: int = 50,
) -> list[Path]:
    """One histogram panel per key of ``panels`` (e.g. ``"before"``, ``"after"`` or one per diagnostic),
    each overlaying its sets (``{"id": scores, "textures": scores, ...}``), shared bins per panel.

    Writes ``path`` with suffix ``.pdf`` and ``.png`` (atomically, via ``greg.io.atomic_path``) and returns
    both paths. Uses ``matplotlib.figure.Figure`` directly: no pyplot state, no backend selection.
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("plot_distributions: no panels given")
    fig = Figure(figsize=(4.0 * len(panels), 3.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, sets) in zip(axes, panels.items()):
        finite = [np.asarray(v, dtype=float)[np.isfinite(v)] for v in sets.values()]
        allv = np.concatenate(finite) if finite else np.zeros(0)
        edges = np.histogram_bin_edges(allv, bins=bins) if allv.size else bins
        for (name, _), v in zip(sets.items(), finite):
            ax.hist(
                v, bins=edges, density=True, histtype="stepfilled", alpha=0.4, label=f"{name} (n={v.size})"
            )
        ax.set_title(str(title))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_before_after(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    score_name: str = "energy",
    bins: int = 50,
) -> list[Path]:
    """Score distributions (ID and each OOD set) before and after fine-tuning, side by side (PDF + PNG)."""
    return plot_distributions(
        {"before fine-tuning": before, "after fine-tuning": after}, path, xlabel=score_name, bins=bins
    )


def plot_diagnostics(
    diagnostics: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    keys: tuple[str, ...] = ("head_grad_norm", "max_logit"),
    bins: int = 50,
) -> list[Path]:
    """The appendix's figure: one panel per diagnostic in ``keys``, ID vs each OOD set."""
    panels = {k: {s: d[k] for s, d in diagnostics.items()} for k in keys}
    return plot_distributions(panels, path, xlabel="value", bins=bins)
