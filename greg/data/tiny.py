"""The ``tiny`` benchmark: a CIFAR-like OOD benchmark built from data that pip packages ship (no network).

- ``tiny`` (ID, 10 classes): scikit-learn's ``load_digits`` (1797 8x8 images) drawn as 3x32x32 images: each digit
  upsampled to 20-26 px, placed at a random position, painted in a random bright colour on a random dark
  background, plus pixel noise. Fixed stratified split: 1297 train / 500 test.
- ``tiny_m`` (ID, 10 classes, the CPU demo's): the same digits, placements and split, in a bright colour on a
  smooth random colour background (blotches and gradients) instead of a flat dark one, so that ID images share
  the OOD sets' brightness and colour variety (mean 0.39 vs 0.27 for ``tiny``).
- ``tiny_aux`` (aux): 1000 random 32x32 crops, at several scales, of scikit-image's colour photographs
  ``astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry``.
- OOD sets: ``tiny_textures`` (600 crops of ``brick, grass, gravel``), ``tiny_faces`` (``lfw_subset``: 200
  faces and their mirror images, 400), ``tiny_photos`` (600 crops of photographs disjoint from the aux ones:
  ``camera, coins, moon, clock, cell, stereo_motorcycle``), ``tiny_gaussian`` (500, N(0.5, 0.25^2) clipped),
  ``tiny_uniform`` (500, U[0, 1]).

Everything is generated from fixed seeds (bit-identical across runs) and cached in memory; generating all
sets takes well under a second. ``root`` is not used.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from greg.data.base import DatasetSpec, RawImages, add

TINY_N_TEST = 500
AUX_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
OOD_PHOTOS = ("camera", "coins", "moon", "clock", "cell", "stereo_motorcycle")
TEXTURES = ("brick", "grass", "gravel")
# Per-channel mean/std of the ``tiny`` train split; tests/test_data.py recomputes them from the images.
TINY_MEAN = (0.26844, 0.26988, 0.27155)
TINY_STD = (0.19713, 0.19787, 0.19933)
# The same for ``tiny_m`` (tests/test_demo.py recomputes them).
TINY_M_MEAN = (0.39730, 0.39381, 0.39410)
TINY_M_STD = (0.21014, 0.21149, 0.21158)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _resize(batch: np.ndarray, size: int) -> np.ndarray:
    """float ``N x H x W x C`` in [0, 1] -> ``N x size x size x C`` (bilinear, antialiased)."""
    import torch  # here, not at the top: the registry (greg data list) is read without torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.permute(0, 2, 3, 1).numpy()


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 x 8 x 8 in 0..16, labels), read from the CSV it ships: importing
    ``sklearn.datasets`` costs seconds, the file takes milliseconds."""
    found = importlib.util.find_spec("sklearn")
    path = (
        Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if found else None
    )
    if path is None or not path.is_file():  # layout changed: fall back to the public API
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices; each class gets ``n_test * n_c / n`` test items up to rounding: items
    are ranked by their (shuffled) position within their class, as a fraction of the class size."""
    perm = np.random.default_rng(seed).permutation(len(y))
    frac = np.empty(len(y))
    for c in np.unique(y):
        members = perm[y[perm] == c]
        frac[members] = (np.arange(len(members)) + 0.5) / len(members)
    rank = np.empty(len(y), dtype=np.int64)
    rank[perm] = np.arange(len(y))
    order = np.lexsort((rank, frac))  # by fraction, ties by shuffled order
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw, y = _load_digits()
    glyphs = (raw / 16.0).astype(np.float32)[..., None]  # N x 8 x 8 x 1 in [0, 1]
    y = y.astype(np.int64)
    rng = np.random.default_rng(20240601)
    n = len(y)
    sizes = rng.integers(20, 27, size=n)
    fg = rng.uniform(0.55, 1.0, size=(n, 3)).astype(np.float32)
    bg = rng.uniform(0.0, 0.35, size=(n, 3)).astype(np.float32)
    mask = np.zeros((n, 32, 32), dtype=np.float32)
    for s in np.unique(sizes):
        idx = np.flatnonzero(sizes == s)
        up = _resize(glyphs[idx], int(s))[..., 0]
        offs = rng.integers(0, 32 - s + 1, size=(len(idx), 2))
        rows = offs[:, :1] + np.arange(s)  # m x s
        cols = offs[:, 1:] + np.arange(s)
        mask[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = up
    out = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * mask[..., None]
    out += 0.04 * rng.standard_normal(size=out.shape, dtype=np.float32)
    images = _to_uint8(out)
    tr, te = stratified_split(y, TINY_N_TEST, seed=0)
    return (_readonly(images[tr]), _readonly(y[tr]), _readonly(images[te]), _readonly(y[te]))


def _smooth_fields(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` colour backgrounds ``32 x 32 x 3`` in [0, 1]: a random colour grid (2x2 to 8x8 cells) upsampled
    bicubically, plus a second, finer grid at random strength: blotches and gradients, no pixel noise."""
    out = np.empty((n, 32, 32, 3), dtype=np.float32)
    coarse = rng.integers(2, 6, size=n)
    fine = rng.integers(8, 17, size=n)
    amp = rng.uniform(0.0, 0.3, size=n).astype(np.float32)
    for g in np.unique(coarse):
        idx = np.flatnonzero(coarse == g)
        out[idx] = _resize(rng.uniform(0, 1, size=(len(idx), g, g, 3)).astype(np.float32), 32)
    for g in np.unique(fine):
        idx = np.flatnonzero(fine == g)
        grid = rng.uniform(-1, 1, size=(len(idx), g, g, 3)).astype(np.float32)
        out[idx] += amp[idx, None, None, None] * _resize(grid, 32)
    return np.clip(out, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def _digits_m() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``tiny_m``: the glyphs of ``tiny`` (same size range and split) composited onto smooth random colour
    backgrounds (in the spirit of MNIST-M, Ganin et al., JMLR 2016), so that ID images are about as bright
    and as varied in colour as the OOD sets and the stroke shapes, not a flat dark frame, tell a digit."""
    raw, y = _load_digits()
    glyphs = (raw / 16.0).astype(np.float32)[..., None]
    y = y.astype(np.int64)
    rng = np.random.default_rng(20240601)
    n = len(y)
    sizes = rng.integers(20, 27, size=n)
    mask = np.zeros((n, 32, 32), dtype=np.float32)
    for s in np.unique(sizes):
        idx = np.flatnonzero(sizes == s)
        up = _resize(glyphs[idx], int(s))[..., 0]
        offs = rng.integers(0, 32 - s + 1, size=(len(idx), 2))
        rows = offs[:, :1] + np.arange(s)
        cols = offs[:, 1:] + np.arange(s)
        mask[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = up
    bg = _smooth_fields(np.random.default_rng(7), n)
    # strokes brighter than the background in every channel (one polarity, as in tiny): a small CNN learns
    # the glyphs in seconds; with both polarities it stayed at chance for 300 steps
    bg *= 0.6
    fg = rng.uniform(0.8, 1.0, size=(n, 3)).astype(np.float32)
    out = bg + (fg[:, None, None, :] - bg) * mask[..., None]
    images = _to_uint8(out)
    tr, te = stratified_split(y, TINY_N_TEST, seed=0)
    return (_readonly(images[tr]), _readonly(y[tr]), _readonly(images[te]), _readonly(y[te]))


# scikit-image sample files; PIL reads them directly (skimage.io's first call imports imageio: ~1 s).
_SKIMAGE_FILES = {
    "astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png", "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png", "camera": "camera.png",
    "coins": "coins.png", "moon": "moon.png", "clock": "clock_motion.png", "cell": "cell.png",
    "stereo_motorcycle": "motorcycle_left.png", "brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
}  # fmt: skip


def _skimage_dir() -> Path:
    found = importlib.util.find_spec("skimage")
    if found is None:
        raise ImportError("the tiny benchmark needs scikit-image (pip install scikit-image)")
    return Path(found.submodule_search_locations[0]) / "data"


def _skimage(name: str) -> np.ndarray:
    """A scikit-image sample as float RGB ``H x W x 3`` in [0, 1]."""
    path = _skimage_dir() / _SKIMAGE_FILES[name]
    if path.is_file():
        from PIL import Image

        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
    else:  # file moved: use the public API
        import skimage.data

        a = getattr(skimage.data, name)()
        if isinstance(a, tuple):  # stereo_motorcycle -> (left, right, disparity)
            a = a[0]
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        a = a[..., :3]
    return a.astype(np.float32) / 255.0


def _crops(names: tuple[str, ...], n: int, seed: int) -> np.ndarray:
    """``n`` random 32x32 crops of the named photos (equal share each), each taken from a copy of the photo
    shrunk by a random factor so a crop covers 1/16 to 1/2 of the shorter side."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    per = np.full(len(names), n // len(names))
    per[: n % len(names)] += 1
    out = []
    for name, k in zip(names, per):
        img = _skimage(name)
        short = min(img.shape[:2])
        fractions = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # crop side / shorter side
        which = rng.integers(0, len(fractions), size=k)
        for j, frac in enumerate(fractions):
            m = int((which == j).sum())
            if m == 0:
                continue
            scale = 32.0 / (frac * short)
            h, w = max(32, round(img.shape[0] * scale)), max(32, round(img.shape[1] * scale))
            t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
            small = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            small = small[0].permute(1, 2, 0).numpy()
            ys = rng.integers(0, h - 32 + 1, size=m)
            xs = rng.integers(0, w - 32 + 1, size=m)
            out += [small[a : a + 32, b : b + 32] for a, b in zip(ys, xs)]
    arr = np.stack(out)
    return _to_uint8(arr[rng.permutation(len(arr))])


@functools.cache
def tiny_images(name: str) -> np.ndarray:
    """uint8 ``N x 32 x 32 x 3`` images of an unlabelled tiny set (deterministic, cached, read-only)."""
    if name == "tiny_aux":
        return _readonly(_crops(AUX_PHOTOS, 1000, seed=1))
    if name == "tiny_photos":
        return _readonly(_crops(OOD_PHOTOS, 600, seed=2))
    if name == "tiny_textures":
        return _readonly(_crops(TEXTURES, 600, seed=3))
    if name == "tiny_faces":
        path = _skimage_dir() / "lfw_subset.npy"
        if path.is_file():
            faces = np.load(path)
        else:
            import skimage.data

            faces = skimage.data.lfw_subset()
        faces = faces.astype(np.float32)  # 200 x 25 x 25 in [0, 1]
        faces = np.concatenate([faces, faces[:, :, ::-1]])[..., None].repeat(3, axis=3)
        return _readonly(_to_uint8(_resize(faces, 32)))
    if name == "tiny_gaussian":
        rng = np.random.default_rng(4)
        return _readonly(_to_uint8(rng.normal(0.5, 0.25, size=(500, 32, 32, 3))))
    if name == "tiny_uniform":
        rng = np.random.default_rng(5)
        return _readonly(rng.integers(0, 256, size=(500, 32, 32, 3), dtype=np.uint8))
    raise KeyError(f"no tiny image set {name!r}")


def _tiny_id(s: DatasetSpec, split: str, root: Path) -> RawImages:
    xtr, ytr, xte, yte = _digits()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    return RawImages(labels=y, images=x)


def _tiny_m_id(s: DatasetSpec, split: str, root: Path) -> RawImages:
    xtr, ytr, xte, yte = _digits_m()
    x, y = (xtr, ytr) if split == "train" else (xte, yte)
    return RawImages(labels=y, images=x)


def _tiny_unlabelled(s: DatasetSpec, split: str, root: Path) -> RawImages:
    x = tiny_images(s.name)
    return RawImages(labels=np.full(len(x), -1, dtype=np.int64), images=x)


# Training augmentation: shifts only; a horizontal flip turns a digit into another glyph (the CIFAR
# crop_flip held the small CNN at 64 % test accuracy).
_common = {"image_size": 32, "mean": TINY_MEAN, "std": TINY_STD, "train_aug": "crop_noflip"}
add(DatasetSpec(
    name="tiny", role="id", num_classes=10, loader=_tiny_id, splits=("train", "test"),
    source="scikit-learn load_digits drawn as 3x32x32 with colour/position jitter",
    sizes={"train": 1797 - TINY_N_TEST, "test": TINY_N_TEST}, **_common,
))  # fmt: skip
# tiny_m: the demo's ID set (README, config/demo.yaml). tiny's OOD/aux sets serve it too: evaluate and train
# pass the ID set, whose statistics normalize them.
add(DatasetSpec(
    name="tiny_m", role="id", num_classes=10, loader=_tiny_m_id, splits=("train", "test"),
    source="tiny's digits composited on smooth random colour backgrounds",
    sizes={"train": 1797 - TINY_N_TEST, "test": TINY_N_TEST},
    **{**_common, "mean": TINY_M_MEAN, "std": TINY_M_STD},
))  # fmt: skip
for _name, _split, _role, _n, _src in (
    ("tiny_aux", "train", "aux", 1000, f"random crops of skimage photos {', '.join(AUX_PHOTOS)}"),
    ("tiny_textures", "test", "ood", 600, f"random crops of skimage textures {', '.join(TEXTURES)}"),
    ("tiny_faces", "test", "ood", 400, "skimage lfw_subset faces and their mirror images"),
    ("tiny_photos", "test", "ood", 600, f"random crops of skimage photos {', '.join(OOD_PHOTOS)}"),
    ("tiny_gaussian", "test", "ood", 500, "N(0.5, 0.25^2) pixel noise, clipped"),
    ("tiny_uniform", "test", "ood", 500, "U[0, 1] pixel noise"),
):
    add(DatasetSpec(
        name=_name, role=_role, num_classes=0, loader=_tiny_unlabelled, splits=(_split,), benchmark="tiny",
        source=_src, sizes={_split: _n}, **_common,
    ))  # fmt: skip
