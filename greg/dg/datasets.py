"""Colored MNIST (IRM construction) and its offline twin on scikit-learn's digits.

IRM construction (Arjovsky et al. 2019, ``code/colored_mnist/main.py``), per restart:
- MNIST training set, first 50 000 images shuffled -> two training environments (even / odd indices),
  last 10 000 -> test environment; images 2x sub-sampled to 14x14, scaled to [0, 1];
- binary label ``y = [digit < 5]``, flipped with probability 0.25 (label noise);
- colour ``c = y`` flipped with probability ``e``: 0.2 and 0.1 in the two training environments, 0.9
  in the test environment; the image goes to channel ``c`` of a 2-channel image (the other is zeroed).
Then 20 % of each training environment is held out for training-domain validation (DomainBed).

Label-shift variant (``*_ls``; our reading, the paper gives no construction): the same environments,
each sub-sampled so the class prior ``P(y = 1)`` is 0.7 and 0.3 in the two training environments and
0.5 in the test environment (``LABEL_SHIFT_PRIORS``); colour and label noise are unchanged.

``colored_digits`` applies the identical recipe to ``sklearn.datasets.load_digits`` (1 797 images of
8x8, no sub-sampling, values / 16): 2/3 for the two training environments, 1/3 for the test one.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from greg.registry import Registry

LABEL_NOISE = 0.25
TRAIN_COLOR_FLIPS = (0.2, 0.1)  # IRM order: env 0 has e = 0.2, env 1 has e = 0.1
TEST_COLOR_FLIP = 0.9
HOLDOUT_FRACTION = 0.2
LABEL_SHIFT_PRIORS = (0.7, 0.3, 0.5)  # P(y=1) in train env 0, train env 1, test env

# torchvision.datasets.MNIST mirrors and md5 sums (only the training files are used, as in IRM).
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_RESOURCES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Training steps of the protocol (full batch): IRM uses 501 for Colored MNIST; see docs/DG.md.
DEFAULT_STEPS = {
    "colored_mnist": 501,
    "colored_mnist_ls": 501,
    "colored_digits": 501,
    "colored_digits_ls": 501,
}

Env = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DGEnvironments:
    """Training environments (80 %), their held-out 20 %, and the test environment."""

    name: str
    train: list[Env]
    val: list[Env]
    test: Env
    input_shape: tuple[int, ...]
    num_outputs: int = 1  # one logit, BCE (IRM protocol)
    info: dict = field(default_factory=dict)

    def to(self, device: str | torch.device) -> DGEnvironments:
        mv = lambda e: (e[0].to(device), e[1].to(device))
        return DGEnvironments(
            self.name,
            [mv(e) for e in self.train],
            [mv(e) for e in self.val],
            mv(self.test),
            self.input_shape,
            self.num_outputs,
            self.info,
        )


DG_DATASETS: Registry[DGEnvironments] = Registry("DG dataset")


# ---------------------------------------------------------------------------------------- construction
def color_environment(
    images: np.ndarray,
    digits: np.ndarray,
    color_flip: float,
    rng: np.random.Generator,
    label_noise: float = LABEL_NOISE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IRM ``make_environment``: returns ``(x N x 2 x H x W float32, y int64, colour int64)``."""
    y = (digits < 5).astype(np.int64)
    y = y ^ (rng.random(len(y)) < label_noise).astype(np.int64)
    colour = y ^ (rng.random(len(y)) < color_flip).astype(np.int64)
    x = np.stack([images, images], axis=1).astype(np.float32)
    x[np.arange(len(x)), 1 - colour] = 0.0
    return x, y, colour


def subsample_prior(y: np.ndarray, prior: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the largest subset of ``y`` whose fraction of ones is ``prior`` (sorted)."""
    ones, zeros = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(ones) / max(len(y), 1) > prior:
        ones = rng.choice(ones, round(prior / (1 - prior) * len(zeros)), replace=False)
    else:
        zeros = rng.choice(zeros, round((1 - prior) / prior * len(ones)), replace=False)
    return np.sort(np.concatenate([ones, zeros]))


def build_environments(
    name: str,
    train_images: np.ndarray,
    train_digits: np.ndarray,
    test_images: np.ndarray,
    test_digits: np.ndarray,
    seed: int,
    label_shift: bool = False,
) -> DGEnvironments:
    """Colour the pools (training pool split even/odd), apply label shift, hold out 20 % for validation."""
    rng = np.random.default_rng(seed)
    pools = [
        (train_images[0::2], train_digits[0::2], TRAIN_COLOR_FLIPS[0]),
        (train_images[1::2], train_digits[1::2], TRAIN_COLOR_FLIPS[1]),
        (test_images, test_digits, TEST_COLOR_FLIP),
    ]
    envs, info = [], {"color_flips": [p[2] for p in pools], "label_noise": LABEL_NOISE}
    for k, (imgs, digs, flip) in enumerate(pools):
        x, y, _ = color_environment(imgs, digs, flip, rng)
        if label_shift:
            keep = subsample_prior(y, LABEL_SHIFT_PRIORS[k], rng)
            x, y = x[keep], y[keep]
        envs.append((torch.from_numpy(x), torch.from_numpy(y)))
    if label_shift:
        info["label_priors"] = list(LABEL_SHIFT_PRIORS)
    train, val = [], []
    for x, y in envs[:2]:
        perm = torch.from_numpy(rng.permutation(len(y)))
        n_val = round(HOLDOUT_FRACTION * len(y))
        val.append((x[perm[:n_val]], y[perm[:n_val]]))
        train.append((x[perm[n_val:]], y[perm[n_val:]]))
    return DGEnvironments(name, train, val, envs[2], tuple(envs[0][0].shape[1:]), 1, info)


# -------------------------------------------------------------------------------------------- digits
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _colored_digits(seed: int, root: str | Path | None = None, label_shift: bool = False) -> DGEnvironments:
    images, digits = load_digits_arrays()
    perm = np.random.default_rng(seed).permutation(len(digits))
    images, digits = images[perm], digits[perm]
    n_train = (2 * len(digits)) // 3
    name = "colored_digits_ls" if label_shift else "colored_digits"
    return build_environments(
        name, images[:n_train], digits[:n_train], images[n_train:], digits[n_train:], seed + 1, label_shift
    )


@DG_DATASETS.register("colored_digits")
def colored_digits(seed: int, root: str | Path | None = None) -> DGEnvironments:
    return _colored_digits(seed, root, label_shift=False)


@DG_DATASETS.register("colored_digits_ls")
def colored_digits_ls(seed: int, root: str | Path | None = None) -> DGEnvironments:
    return _colored_digits(seed, root, label_shift=True)


# --------------------------------------------------------------------------------------------- MNIST
def download_mnist(root: str | Path, files: tuple[str, ...] | None = None, progress: bool = True) -> Path:
    """Fetch the MNIST idx files into ``root/mnist/raw`` (torchvision mirrors) with the project's resumable
    downloader, verify their md5, and return the directory. A file is renamed into place only once verified."""
    from greg.data.downloader import DownloadError, fetch, file_digest

    raw = Path(root) / "mnist" / "raw"
    for fname in files or tuple(MNIST_RESOURCES):
        md5 = MNIST_RESOURCES[fname]
        dest = raw / fname
        if dest.is_file() and file_digest(dest, "md5") == md5:
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                part = fetch(mirror + fname, dest, progress=progress)
            except DownloadError as e:  # try the next mirror
                errors.append(str(e))
                continue
            got = file_digest(part, "md5")
            if got == md5:
                part.replace(dest)
                break
            part.unlink()
            errors.append(f"{mirror + fname}: md5 {got}, expected {md5}")
        else:
            raise RuntimeError(f"cannot download MNIST file {fname} to {dest}:\n  " + "\n  ".join(errors))
    return raw


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: idx magic {got}, expected {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_train(root: str | Path, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    raw = Path(root) / "mnist" / "raw"
    if download:
        download_mnist(root, files)
    for f in files:
        if not (raw / f).is_file():
            raise FileNotFoundError(f"MNIST file missing: {raw / f} (run with download enabled)")
    images = _read_idx(raw / files[0], 2051)
    labels = _read_idx(raw / files[1], 2049).astype(np.int64)
    return images, labels


def _colored_mnist(seed: int, root: str | Path | None, label_shift: bool) -> DGEnvironments:
    images, labels = load_mnist_train(root or "data")
    images = images[:, ::2, ::2].astype(np.float32) / 255.0
    perm = np.random.default_rng(seed).permutation(50_000)  # IRM shuffles only the first 50k
    name = "colored_mnist_ls" if label_shift else "colored_mnist"
    return build_environments(
        name,
        images[:50_000][perm],
        labels[:50_000][perm],
        images[50_000:],
        labels[50_000:],
        seed + 1,
        label_shift,
    )


@DG_DATASETS.register("colored_mnist")
def colored_mnist(seed: int, root: str | Path | None = None) -> DGEnvironments:
    return _colored_mnist(seed, root, label_shift=False)


@DG_DATASETS.register("colored_mnist_ls")
def colored_mnist_ls(seed: int, root: str | Path | None = None) -> DGEnvironments:
    return _colored_mnist(seed, root, label_shift=True)


def load(name: str, seed: int, root: str | Path | None = None) -> DGEnvironments:
    factory: Callable[..., DGEnvironments] = DG_DATASETS.get(name)
    return factory(seed, root)
