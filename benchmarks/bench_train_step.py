"""Training-step and k-means cost ratios, measured side by side in one run (not part of the tests).

(a) GReg step / plain energy-loss step: forward + backward + SGD step on the same model and batch
    (``greg.methods`` "greg" vs "energy"; the GReg step adds the double backprop of L_grad). Target <= 2.6.
    One row per ``grad_backend`` (``greg.methods.grad_reg.GRAD_BACKENDS``): ``exact`` (default, hand-written
    batch-norm double backward), ``exact_native`` (the reference: PyTorch's own, the code before),
    ``exact_compiled`` (``exact`` with the batch-norm double backward through ``torch.compile``; compiled
    during the warm-up round), ``fd`` (finite difference, no double backprop; target <= 2.2).
(b) our GReg step / the official one reimplemented below: the released code computes L_grad with
    ``torch.autograd.functional.jacobian`` of the summed hinge objective w.r.t. the input, which runs a
    SECOND forward of the network (``create_graph=True``); ours reuses the training forward. Target <= 0.85.
(c) each ``greg.sampling`` k-means backend / scikit-learn ``KMeans(n_init=3)`` (the released GReg+ code) on
    384 x 342 L2-normalized features into 64 clusters, with the inertia ratio. Target: torch <= 0.1 at
    inertia within 2 %.

The candidates of each comparison run round-robin inside every repeat (so load changes on a shared machine
hit all of them alike), after warm-up; the ratios are of median times.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --device cpu --model densenet100 --batch 16
    python benchmarks/bench_train_step.py --model small_cnn --repeats 5          # quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from greg import methods, models
from greg.sampling import kmeans


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds (user + system) of each function; all run once
    per round, in turn. On a shared CPU box CPU time leaves out the time the process waited for a core."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    wall = {name: statistics.median(ts) for name, ts in times.items()}
    return wall, {name: statistics.median(ts) for name, ts in cpu.items()}


# ------------------------------------------------------------------------------ the official GReg step


def official_greg_loss(
    model: nn.Module, x_id: torch.Tensor, y_id: torch.Tensor, x_aux: torch.Tensor, hp: dict
) -> torch.Tensor:
    """GReg's loss as the released code computes it: the training forward gives CE + energy loss, then
    ``torch.autograd.functional.jacobian(objective, x, create_graph=True)`` re-runs the network on ``x`` to
    get ``G = dJ/dx`` of ``J = -mean_ID relu(m_in - S) + mean_aux relu(S - m_out)``;
    ``L_grad = mean_i ||G_i||``. Both forwards in train mode (batch norm sees ID and aux together twice)."""
    n_id = x_id.shape[0]
    m_in, m_out = float(hp["m_in"]), float(hp["m_out"])
    x = torch.cat([x_id, x_aux], dim=0)
    logits = model(x)
    s = -torch.logsumexp(logits, dim=1)
    ce = F.cross_entropy(logits[:n_id], y_id)
    l_s = torch.relu(s[:n_id] - m_in).pow(2).mean() + torch.relu(m_out - s[n_id:]).pow(2).mean()

    def objective(inp: torch.Tensor) -> torch.Tensor:
        s2 = -torch.logsumexp(model(inp), dim=1)
        return -torch.relu(m_in - s2[:n_id]).mean() + torch.relu(s2[n_id:] - m_out).mean()

    g = torch.autograd.functional.jacobian(objective, x, create_graph=True)  # same shape as x
    l_grad = g.flatten(1).norm(p=2, dim=1).mean()
    return ce + float(hp["lambda_S"]) * l_s + float(hp["lambda_grad"]) * l_grad


# ----------------------------------------------------------------------------------------- the steps


def make_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    """forward + backward + SGD step of ``loss_fn(model)`` on ``model`` (a private copy per candidate).

    ``lr=0``: the update arithmetic runs as usual but the weights stay put, so every repeat times the same
    computation (a random-init network on random inputs would otherwise diverge within a few steps).
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        opt.step()

    return step


def bench_steps(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    torch.manual_seed(0)
    base = models.create(args.model, num_classes=10).to(device).train()
    b = args.batch
    x_id = torch.randn(b, 3, 32, 32, device=device)
    y_id = torch.randint(0, 10, (b,), device=device)
    x_aux = torch.randn(2 * b, 3, 32, 32, device=device)
    batch = {"x_id": x_id, "y_id": y_id, "x_aux": x_aux}
    energy = methods.create("energy")
    gregs = {b: methods.create("greg", grad_backend=b) for b in args.backends}
    greg = gregs[args.backends[0]]
    assert float(greg.hparams["lambda_grad"]) > 0 and float(energy.hparams["lambda_grad"]) == 0
    # Ours and the official step compute the same objective (train mode: batch statistics in both).
    ours = {b: g.compute_loss(copy.deepcopy(base), batch)["total"].item() for b, g in gregs.items()}
    theirs = official_greg_loss(copy.deepcopy(base), x_id, y_id, x_aux, greg.hparams).item()
    print("loss check (train mode): " + "  ".join(f"{b} {v:.6f}" for b, v in ours.items()), end="")
    print(f"  official {theirs:.6f}")
    steps = {"energy": make_step(copy.deepcopy(base), lambda m: energy.compute_loss(m, batch)["total"])}
    for b, g in gregs.items():
        steps[f"greg_{b}"] = make_step(copy.deepcopy(base), lambda m, g=g: g.compute_loss(m, batch)["total"])
    if not args.skip_official:
        steps["greg_official"] = make_step(
            copy.deepcopy(base), lambda m: official_greg_loss(m, x_id, y_id, x_aux, greg.hparams)
        )
    return race(steps, args.warmup, args.repeats, device)


def bench_greg_plus(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One GReg+ step (candidate scoring + k-means + selection, then the GReg loss on ID + selected,
    backward, SGD): median step time, the selection's share of it, and images/s (ID + candidates)."""
    torch.manual_seed(0)
    model = models.create(args.model, num_classes=10).to(device).train()
    b, n_cand = args.plus_batch, args.plus_candidates
    batch = {
        "x_id": torch.randn(b, 3, 32, 32, device=device),
        "y_id": torch.randint(0, 10, (b,), device=device),
        "x_aux": torch.randn(n_cand, 3, 32, 32, device=device),
    }
    method = methods.create(
        "greg_plus",
        n_clusters=args.plus_clusters,
        n_selected=args.plus_selected,
        grad_backend=args.backends[0],
    )
    select, sel_time = method.select, [0.0]

    def timed_select(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        _sync(device)
        t = time.perf_counter()
        idx = select(m, x)
        _sync(device)
        sel_time[0] = time.perf_counter() - t
        return idx

    method.select = timed_select  # type: ignore[method-assign]
    step = make_step(model, lambda m: method.compute_loss(m, batch)["total"])
    totals, sels = [], []
    for r in range(args.warmup + args.repeats):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        if r >= args.warmup:
            totals.append(time.perf_counter() - t)
            sels.append(sel_time[0])
    total = statistics.median(totals)
    return {
        "step_s": total,
        "selection_share": statistics.median(s / t for s, t in zip(sels, totals)),
        "images_per_s": (b + n_cand) / total,
    }


def bench_selection_identity(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Does the GReg+ candidate scoring keep the selected indices under ``channels_last`` and/or bf16
    autocast? Same model, candidates and k-means seed as the float32 NCHW reference; per variant the share
    of selected indices it shares with the reference, whether the sets are identical, and the scoring time
    ratio (median over ``--repeats``)."""
    from greg.sampling import ClusterSampler

    torch.manual_seed(0)
    model = models.create(args.model, num_classes=10).to(device).eval()
    n_cand = args.plus_candidates
    x = torch.randn(n_cand, 3, 32, 32, device=device)
    sampler = ClusterSampler(k=args.plus_clusters, n_total=args.plus_selected)
    variants = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True)}
    variants["channels_last+bf16"] = (True, True)
    out: dict[str, dict[str, float]] = {}
    ref: set[int] = set()
    for name, (cl, bf16) in variants.items():
        fmt = torch.channels_last if cl else torch.contiguous_format
        m = copy.deepcopy(model).to(memory_format=fmt)
        xv = x.contiguous(memory_format=fmt)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        times = []
        for _ in range(args.warmup + args.repeats):
            _sync(device)
            t = time.perf_counter()
            with amp:
                idx = sampler.select(m, xv, torch.Generator(device="cpu").manual_seed(0))
            _sync(device)
            times.append(time.perf_counter() - t)
        picked = set(idx.tolist())
        ref = ref or picked
        out[name] = {
            "overlap": len(picked & ref) / len(ref),
            "identical": float(picked == ref),
            "ms": 1e3 * statistics.median(times[args.warmup :]),
        }
    for r in out.values():
        r["time_ratio"] = r["ms"] / out["fp32"]["ms"]
    return out


# --------------------------------------------------------------------------------------------- k-means


def kmeans_features(kind: str, seed: int, n: int = 384, d: int = 342) -> torch.Tensor:
    """L2-normalized features of the GReg+ candidate shape: isotropic Gaussian, or ReLU'd noisy blobs
    (40 centres; closer to pooled post-ReLU network features)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    else:
        centres = torch.randn(40, d, generator=g)
        x = torch.relu(
            centres[torch.randint(0, 40, (n,), generator=g)] * 0.5 + 0.6 * torch.randn(n, d, generator=g)
        )
    return F.normalize(x, dim=1)


def bench_kmeans(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    backends = ("torch", "faiss", "sklearn")
    for kind in ("random", "blob"):
        times: dict[str, list[float]] = {b: [] for b in backends}
        inertia: dict[str, list[float]] = {b: [] for b in backends}
        for seed in range(args.kmeans_datasets):
            x = kmeans_features(kind, seed).to(device)
            for r in range(args.warmup + args.kmeans_repeats):
                for backend in backends:
                    _sync(device)
                    t = time.perf_counter()
                    res = kmeans(x, 64, backend=backend, seed=r)
                    _sync(device)
                    if r >= args.warmup:
                        times[backend].append(time.perf_counter() - t)
                        inertia[backend].append(res.inertia)
        ref_t = statistics.median(times["sklearn"])
        for backend in backends:
            ratios = [a / b for a, b in zip(inertia[backend], inertia["sklearn"])]
            out[f"{kind}/{backend}"] = {
                "ms": 1e3 * statistics.median(times[backend]),
                "time_ratio": statistics.median(times[backend]) / ref_t,
                "inertia_ratio_mean": statistics.mean(ratios),
                "inertia_ratio_max": max(ratios),
            }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--model", default="densenet100", help="densenet100 (default) or small_cnn for a quick run"
    )
    p.add_argument("--batch", type=int, default=16, help="ID batch; the auxiliary batch is twice that")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the training steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kmeans-repeats", type=int, default=5, help="timed seeds per k-means data set")
    p.add_argument("--kmeans-datasets", type=int, default=2, help="data sets per kind (random, blob)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    p.add_argument(
        "--backends",
        default="exact_native,exact,exact_compiled,fd",
        help="comma-separated grad_backend values to time (greg.methods.grad_reg.GRAD_BACKENDS)",
    )
    p.add_argument("--skip-official", action="store_true", help="do not time the released jacobian step")
    p.add_argument("--greg-plus", action="store_true", help="time a GReg+ step (selection share, images/s)")
    p.add_argument("--plus-batch", type=int, default=64, help="GReg+ ID batch (paper: 64)")
    p.add_argument("--plus-candidates", type=int, default=384, help="GReg+ candidates per step (paper: 384)")
    p.add_argument("--plus-selected", type=int, default=128, help="GReg+ selected outliers (paper: 128)")
    p.add_argument("--plus-clusters", type=int, default=64, help="GReg+ k-means clusters (paper: 64)")
    p.add_argument(
        "--selection-check",
        action="store_true",
        help="GReg+ candidate scoring under channels_last / bf16 autocast: are the selected indices identical?",
    )
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-kmeans", action="store_true")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from greg.methods.grad_reg import GRAD_BACKENDS

    bad = [b for b in args.backends if b not in GRAD_BACKENDS]
    if bad or not args.backends:
        p.error(f"--backends: unknown {bad}; known {list(GRAD_BACKENDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, model {args.model}, "
        f"batch {args.batch}+{2 * args.batch}, repeats {args.repeats}, warmup {args.warmup}"
    )
    if not args.skip_steps:
        t, c = bench_steps(args, device)
        print("\ntraining step (median wall s): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
        if device.type == "cpu":
            print("training step (median CPU s):  " + ", ".join(f"{k} {v:.3f}" for k, v in c.items()))
        for b in args.backends:
            target = "2.2" if b == "fd" else "2.6"
            cpu_ratio = f", CPU time {c[f'greg_{b}'] / c['energy']:.2f}" if device.type == "cpu" else ""
            print(
                f"(a) GReg[{b}] / energy step        = {t[f'greg_{b}'] / t['energy']:.2f}{cpu_ratio}   "
                f"(target <= {target})"
            )
            if "greg_official" in t:
                ratio = t[f"greg_{b}"] / t["greg_official"]
                print(f"(b) GReg[{b}] / official GReg step = {ratio:.2f}   (target <= 0.85)")
    if args.greg_plus:
        r = bench_greg_plus(args, device)
        print(
            f"\nGReg+ step [{args.backends[0]}] {args.plus_batch} ID + {args.plus_candidates} candidates -> "
            f"{args.plus_selected}: {r['step_s']:.3f} s, selection share {100 * r['selection_share']:.1f} %, "
            f"{r['images_per_s']:.1f} images/s (ID + candidates)"
        )
    if args.selection_check:
        sel = bench_selection_identity(args, device)
        print(
            f"\nGReg+ selection ({args.plus_candidates} candidates -> {args.plus_selected}, "
            f"{args.plus_clusters} clusters) vs float32 NCHW:"
        )
        for name, r in sel.items():
            print(
                f"{name:<20} identical {'yes' if r['identical'] else 'NO ':<4} overlap {100 * r['overlap']:5.1f} %  "
                f"scoring + selection {r['ms']:8.1f} ms  time ratio {r['time_ratio']:.2f}"
            )
    if not args.skip_kmeans:
        res = bench_kmeans(args, device)
        print(
            "\n(c) k-means 384 x 342 -> 64 clusters, vs sklearn KMeans(n_init=3)   (target: torch <= 0.1, "
            "inertia within 2 %)"
        )
        print(
            f"{'data/backend':<16}{'median ms':>10}{'time ratio':>12}{'inertia mean':>14}{'inertia max':>13}"
        )
        for name, r in res.items():
            print(
                f"{name:<16}{r['ms']:>10.1f}{r['time_ratio']:>12.3f}{r['inertia_ratio_mean']:>14.4f}"
                f"{r['inertia_ratio_max']:>13.4f}"
            )


if __name__ == "__main__":
    main()
