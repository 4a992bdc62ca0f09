"""One restart of a DG experiment: build the environments, train full-batch, report accuracies."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from greg.dg import algorithms
from greg.dg.datasets import DGEnvironments
from greg.dg.penalties import accuracy


@torch.no_grad()
def evaluate(alg: algorithms.Algorithm, envs: DGEnvironments) -> dict[str, float]:
    """Train / val accuracy = mean over the training environments (IRM / DomainBed), test = test env."""
    alg.eval()
    acc = lambda e: accuracy(alg.predict(e[0]), e[1])
    out = {
        "train_acc": sum(acc(e) for e in envs.train) / len(envs.train),
        "val_acc": sum(acc(e) for e in envs.val) / len(envs.val),
        "test_acc": acc(envs.test),
    }
    alg.train()
    return out


def _batches(envs: DGEnvironments, batch_size: int, gen: torch.Generator):
    if not batch_size:  # full batch (IRM protocol)
        return list(envs.train)
    out = []
    for x, y in envs.train:
        idx = torch.randint(0, len(y), (batch_size,), generator=gen).to(y.device)
        out.append((x[idx], y[idx]))
    return out


def train_restart(
    algorithm: str,
    envs: DGEnvironments,
    hparams: dict[str, Any],
    steps: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``algorithm`` for ``steps`` updates on ``envs`` and return the final accuracies (percent)."""
    envs = envs.to(device)
    t0 = time.time()
    # Seed the global RNG only for the weight initialisation (nn.init uses it), without leaking.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        alg = algorithms.create(
            algorithm, envs.input_shape, envs.num_outputs, len(envs.train), hparams, device=device, seed=seed
        )
    gen = torch.Generator().manual_seed(seed + 7)
    last: dict[str, float] = {}
    for _ in tqdm(range(steps), desc=f"{algorithm} seed {seed}", disable=not progress, leave=False):
        last = alg.update(_batches(envs, int(hparams.get("batch_size", 0)), gen))
    accs = evaluate(alg, envs)
    row: dict[str, Any] = {k: 100.0 * v for k, v in accs.items()}
    row.update({f"final_{k}": float(v) for k, v in last.items()})
    row["seconds"] = time.time() - t0
    return row
