"""The training data stream: a resumable, seeded order of items and per-item seeded augmentation.

The item at stream position ``p`` and its augmentation are functions of ``(seed, stream, p)`` only, so a
resumed run sees the same batches as an uninterrupted one whatever the number of loader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from greg.config import mix


def _perm(n: int, *key: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix(*key)))


def aux_pool_size(n_aux: int, pool_per_epoch: int | None) -> int:
    """Auxiliary images an epoch draws from: ``data.aux_pool_per_epoch`` capped at the set's size, as the
    released code's ``min(size_candidate_ood, len(aux))`` (o4lc/Greg-OOD train_sea.py@4761101:155); None =
    the whole set."""
    return n_aux if pool_per_epoch is None else min(int(pool_per_epoch), n_aux)


def ratio_candidates(pool: int, n_id: int, batch_size: int) -> int:
    """``aux_batch_size: ratio``: candidates per step ``floor(pool / n_id * batch_size)`` (at least 1), so one
    epoch of ID batches walks through the epoch's pool (released ``int(...)``, train_sea.py@4761101:240).
    Integer arithmetic: the exact floor, no float rounding (CIFAR: 300000 * 64 // 50000 = 384)."""
    return max(1, pool * batch_size // n_id)


class StreamSampler(Sampler):
    """Yields ``(item_seed, index)`` for stream positions ``start, start+1, ...``.

    Position ``p`` belongs to pass ``p // per_pass`` over the data, which uses its own permutation; so
    the item at any position is known without replaying the stream, and augmentation is seeded per item.

    ``pool`` (< n): each pass first draws its own random ``pool`` of the ``n`` items (the first ``pool`` of
    the pass's permutation: a uniform subset in random order) and walks through that pool only, reshuffled
    if the pass is longer than it; the trainer makes a pass one epoch (GReg+ on ImageNet: 600K of the 990
    other classes per epoch, paper Sec. 6.1 "Sampling Details"). Also a function of ``(seed, stream, p)``.
    """

    def __init__(
        self, n: int, per_pass: int, seed: int, stream: int, start: int, stop: int | None,
        pool: int | None = None,
    ):
        if n <= 0:
            raise ValueError("empty dataset")
        if pool is not None and not 1 <= pool <= n:
            raise ValueError(f"pool must be in [1, {n}], got {pool}")
        self.n, self.per_pass, self.seed, self.stream = n, per_pass, seed, stream
        self.start, self.stop = start, stop
        self.pool = None if pool is None or pool == n else int(pool)
        self._cache: tuple[int, torch.Tensor] | None = None

    def _order(self, rnd: int) -> torch.Tensor:
        """Item indices of pass ``rnd`` (at least ``per_pass`` of them)."""
        key = (self.seed, self.stream, rnd)
        if self.pool is None:
            # A pass longer than the data (tiny aux sets) concatenates permutations.
            reps = math.ceil(self.per_pass / self.n)
            return torch.cat([_perm(self.n, *key, r) for r in range(reps)])
        subset = _perm(self.n, *key, 0)[: self.pool]
        reps = math.ceil(self.per_pass / self.pool)
        return torch.cat([subset] + [subset[_perm(self.pool, *key, r)] for r in range(1, reps)])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start
        while self.stop is None or p < self.stop:
            rnd, off = divmod(p, self.per_pass)
            if self._cache is None or self._cache[0] != rnd:
                self._cache = (rnd, self._order(rnd))
            idx = int(self._cache[1][off])
            yield mix(self.seed, self.stream, rnd, off), idx
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


def loader(ds: Dataset, sampler: StreamSampler, batch_size: int, workers: int, device: torch.device):
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

