"""Figures of ``greg report``: Fig. 3 (training curves), Fig. 4 (score histograms), the SAM appendix figure.

Each is written as PDF and PNG (same stem), atomically. matplotlib is imported inside the plotting
functions, so importing this module (``greg report`` start-up) stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from greg import io
from greg.errors import ReportError
from greg.tables import mean_std


def _save_figure(fig: Any, out: str | Path) -> list[Path]:
    """Lay out ``fig`` (a ``matplotlib.figure.Figure``: no pyplot state, nothing to close) and write ``out``
    (PDF) and the PNG of the same stem, atomically."""
    if fig.get_layout_engine() is None:  # the figures below use constrained layout (legends outside the axes)
        fig.tight_layout()
    out = Path(out)
    paths = [out.with_suffix(".pdf"), out.with_suffix(".png")]
    for p in paths:
        with io.atomic_open(p, "wb") as f:
            fig.savefig(f, format=p.suffix[1:], bbox_inches="tight", dpi=150)
    return paths


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}, line {lineno}: not valid JSON ({e.msg}): {line.strip()[:60]!r}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
                raise ReportError(f"{path}, line {lineno}: expected a JSON object with an integer 'step', got "
                                  f"{line.strip()[:60]!r}")
            records.append(rec)
    return records


def series(records: Iterable[dict], key: str, source: str = "log") -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have it; ``source`` names the file in errors."""
    pts = []
    for r in records:
        v = r.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ReportError(f"{source}, step {r['step']}: {key!r} is {v!r}, not a number")
        pts.append((int(r["step"]), float(v)))
    return [s for s, _ in pts], [v for _, v in pts]


def seed_mean(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds at the steps every seed logged."""
    common = set(curves[0][0])
    for steps, _ in curves[1:]:
        common &= set(steps)
    steps = sorted(common)
    maps = [dict(zip(s, v)) for s, v in curves]
    means, stds = [], []
    for s in steps:
        m, sd = mean_std([mp[s] for mp in maps])
        means.append(m)
        stds.append(sd)
    return steps, means, stds


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_fig3(runs: dict[str, list[str]], out: str | Path, keys: tuple[str, str] = ("energy", "score_grad_norm"),
              smooth_window: int | None = None) -> list[Path]:
    """Energy loss and mean input-gradient norm of the score over training steps, one line per run."""
    from matplotlib.figure import Figure  # heavy: only plotting needs it
    from matplotlib.ticker import MaxNLocator

    titles = {"energy": r"energy loss $\mathcal{L}_S$", "score_grad_norm": r"mean $\|\nabla_x S(x)\|_2$"}
    fig = Figure(figsize=(5 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), sharex=True, squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for label, files in runs.items():
            label = f"{label} ({m})" if (m := run_margins(files)) else label
            curves = [series(read_jsonl(f), key, str(f)) for f in files]
            curves = [c for c in curves if c[0]]
            if not curves:
                raise ReportError(f"run {label!r}: no {key!r} values in {', '.join(files)}")
            steps, means, stds = seed_mean(curves)
            w = smooth_window if smooth_window is not None else max(1, len(steps) // 50)
            m, s = smooth(means, w), smooth(stds, w)
            ax.plot(steps, m, label=label)
            if len(curves) > 1:
                ax.fill_between(steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(titles.get(key, key))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # one legend for both panels, below them: it covers no curve
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    return _save_figure(fig, out)


def run_margins(files: list[str]) -> str:
    """The energy-loss margins of a run, from the ``config.yaml`` the trainer writes beside ``metrics.jsonl``
    (``m_in``/``m_out`` of ``method.hparams``), as ``m_in=-25, m_out=-7``; with ``margins: auto`` that they are
    fitted (each run and seed has its own); "" when there is none."""
    cfg = Path(files[0]).with_name("config.yaml") if files else None
    if cfg is None or not cfg.is_file():
        return ""
    doc = io.yaml_load(cfg.read_text(encoding="utf-8")) or {}
    method = doc.get("method") if isinstance(doc, dict) else None
    hp = method.get("hparams") if isinstance(method, dict) else None
    if not isinstance(doc, dict) or not isinstance(method or {}, dict) or not isinstance(hp or {}, dict):
        raise ReportError(f"{cfg}: expected a run config (a mapping with method.hparams), got "
                          f"{type(doc).__name__ if not isinstance(doc, dict) else 'another shape'}")
    hp = hp or {}
    if hp.get("margins") == "auto":  # fitted per run at step 0: m_in / m_out in the config are not used
        return "margins fitted to the start model"
    if hp.get("m_in") is None or hp.get("m_out") is None:
        return ""
    return rf"$m_{{in}}$={hp['m_in']:g}, $m_{{out}}$={hp['m_out']:g}"


def load_scores(path: str | Path) -> Any:
    """Per-sample scores from a ``greg evaluate`` npz: the ``scores`` array (or the file's only array)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file not found: {path}")
    with np.load(path) as z:
        if "scores" in z.files:
            return np.asarray(z["scores"], dtype=np.float64)
        if len(z.files) == 1:
            return np.asarray(z[z.files[0]], dtype=np.float64)
        raise ReportError(f"{path}: no 'scores' array (has {', '.join(z.files)})")


def plot_fig4(models: dict[str, list[str]], ood: str, out: str | Path, id_label: str = "ID",
              ood_label: str | None = None, bins: int = 60) -> list[Path]:
    """Histograms of the energy score, ID test set vs one OOD set, one panel per model (seeds pooled)."""
    from matplotlib.figure import Figure  # heavy: only plotting needs it
    fig = Figure(figsize=(4 * len(models), 3.4), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False, sharex=True, sharey=True)  # one score, one axis
    for ax, (label, dirs) in zip(axes[0], models.items()):
        s_id = np.concatenate([load_scores(Path(d) / "scores" / "id.npz") for d in dirs])
        s_ood = np.concatenate([load_scores(Path(d) / "scores" / f"{ood}.npz") for d in dirs])
        both = np.concatenate([s_id, s_ood])
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        ax.hist(s_id, bins=edges, alpha=0.6, density=True, label=id_label)
        ax.hist(s_ood, bins=edges, alpha=0.6, density=True, label=ood_label or ood)
        ax.set_title(label)
        ax.set_xlabel(r"energy score $S(x)$ (higher = more OOD)")
    axes[0][0].set_ylabel("density")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle(pooled_note(models))
    return _save_figure(fig, out)


def pooled_note(models: dict[str, list[str]]) -> str:
    """What each fig4 panel holds, printed on the figure: the per-sample scores of every seed's model, pooled."""
    counts = sorted({len(dirs) for dirs in models.values()})
    if counts == [1]:
        return "Per-sample scores of one model (one seed) per panel"
    seeds = f"{counts[0]} seeds" if len(counts) == 1 else "its seeds"
    return f"Each panel pools the per-sample scores of {seeds}' models"


def _diagnostics():  # type: ignore[no-untyped-def]
    # on use: it needs torch and the models (~2.5 s to import), which the table/plot jobs never touch
    from greg import diagnostics

    return diagnostics


# SAM appendix figure: titles of the greg.diagnostics arrays (raw values, not outlier scores).
SAM_DIAGNOSTICS = {
    "head_grad_norm": r"per-sample head gradient norm $\|\nabla_W \mathrm{CE}(f, \hat y)\|$",
    "max_logit": r"max logit $\max_k f_k(x)$",
    "energy": r"energy score $-\log\sum_k e^{f_k(x)}$ (higher = more OOD)",
    "msp": r"max softmax probability",
}


def collect_fig_sam(models: dict[str, str], id_dataset: str, ood: list[str], root: str, device: str = "cpu",
                    max_samples: int | None = 2000, batch_size: int = 256) -> dict[str, dict[str, dict]]:
    """``{label: {set: {diagnostic: array}}}`` for each run checkpoint (``greg.diagnostics.collect_checkpoint``:
    ID test split as ``"id"`` and each OOD set, the same subsample of each set for every model)."""
    out = {}
    for label, ckpt in models.items():
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"model {label!r}: checkpoint not found: {ckpt}")
        out[label] = _diagnostics().collect_checkpoint(ckpt, id_dataset, ood, root, device, batch_size=batch_size,
                                                    max_samples=max_samples)
    return out


def plot_fig_sam(diags: dict[str, dict[str, dict]], out: str | Path,
                 keys: tuple[str, ...] = ("head_grad_norm", "max_logit", "energy"),
                 set_labels: dict[str, str] | None = None, bins: int = 50) -> list[Path]:
    """The SAM appendix's diagnostics: one row per model (the first: before fine-tuning), one column per
    diagnostic, each panel the histograms of the ID test set and of every OOD set. Bins are shared down a
    column, so the last column shows the score distributions before vs after fine-tuning on one axis."""
    from matplotlib.figure import Figure  # heavy: only plotting needs it

    if not diags:
        raise ReportError("fig-sam: no models")
    bad = [k for k in keys if k not in SAM_DIAGNOSTICS]
    if bad:
        raise ReportError(f"fig-sam: unknown diagnostic(s) {bad}; known: {', '.join(SAM_DIAGNOSTICS)}")
    from matplotlib.ticker import MaxNLocator

    set_labels = set_labels or {}
    fig = Figure(figsize=(4.2 * len(keys), 2.6 * len(diags) + 0.8), layout="constrained")
    # a column compares one diagnostic across models: shared x (and bins)
    axes = fig.subplots(len(diags), len(keys), squeeze=False, sharex="col")
    for j, key in enumerate(keys):
        values = [np.asarray(d[key], dtype=float) for sets in diags.values() for d in sets.values()]
        finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
        edges = np.histogram_bin_edges(finite, bins=bins) if finite.size else np.linspace(0.0, 1.0, bins + 1)
        for i, (label, sets) in enumerate(diags.items()):
            ax = axes[i][j]
            for name, d in sets.items():
                v = np.asarray(d[key], dtype=float)
                ax.hist(v[np.isfinite(v)], bins=edges, density=True, histtype="step", linewidth=1.2,
                        label=set_labels.get(name, "ID" if name == "id" else name))
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # long tick labels (head gradient norm) never touch
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4))
            if i == len(diags) - 1:  # shared x: the label once, under the column
                ax.set_xlabel(SAM_DIAGNOSTICS[key], fontsize="small")
            if j == 0:  # row label: the model, once per row
                ax.set_ylabel(f"{label}\ndensity")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    return _save_figure(fig, out)


def save_fig_sam_npz(path: str | Path, diags: dict[str, dict[str, dict]]) -> None:
    """Every array of the figure in one ``.npz`` (atomic), named ``<model label>/<set>/<diagnostic>``."""
    _diagnostics().save_npz(path, {f"{label}/{name}": d for label, sets in diags.items() for name, d in sets.items()})

