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

