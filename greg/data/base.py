"""Dataset specs, the registry, the image transform and the torch ``Dataset`` every loader returns.

A dataset is described once by a :class:`DatasetSpec` (what it is, where it comes from, how it is laid out on
disk) and read by its ``loader`` into :class:`RawImages` (a uint8 ``N x H x W x 3`` array or a list of image
files, plus labels). :func:`load` wraps the raw images into an :class:`ImageDataset` whose transform comes from
the **ID** dataset's spec: resize/center-crop to the ID image size and normalize with the ID mean/std.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from greg.registry import Registry

if TYPE_CHECKING:  # torch is imported where it is used: `greg data list` and `greg --help` run without it
    import torch
    from torch.utils.data import Dataset, Subset

#: ``weights``: a released checkpoint, downloaded and verified like a dataset but never loaded as images.
ROLES = ("id", "aux", "ood", "weights")
#: OOD test sets are subsampled to this many images (the paper's protocol); pass ``n_max=N_OOD`` to ``load``.
N_OOD = 10000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Largest image file decoded (width x height; 8192 x 8192): the biggest real images of the catalog (ImageNet,
#: ~12 Mpx) are far below; above it a file is refused before decoding (a decompression bomb would take GBs).
MAX_IMAGE_PIXELS = 8192 * 8192
#: Largest ratio of an image's longer to its shorter side: resizing the shorter side to the ID size scales the
#: longer one by as much (a 1 x 2,000,000 image, under the pixel cap, would become 32 x 64,000,000). 64 is far
#: above any catalog image (assumption: ImageNet's most elongated photos are about 1:10).
MAX_ASPECT_RATIO = 64
#: Pixel modes with 16-bit samples: scaled to 8 bits by v / 257 (65535 -> 255), not clipped.
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")


class CorruptDataError(ValueError):
    """A data file on disk is truncated or malformed (the message names it and what was expected)."""

    def __init__(self, *args: object):
        # DataLoader workers re-raise as ``CorruptDataError("Caught ... Original Traceback ...")``: keep our
        # own one-line message (the traceback's last line) so the CLI still prints one line naming the file.
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().rsplit("\n", 1)[-1]
            args = (last.split("CorruptDataError: ", 1)[-1],)
        super().__init__(*args)


def _to_rgb(im: Any, path: Path) -> Any:
    """``im`` as 8-bit RGB: 16-bit samples scaled by 1/257 (PIL's ``convert`` would clip them to 255, a white
    image); 32-bit integer or float samples, whose range is not defined, are refused."""
    from PIL import Image

    mode = im.mode
    if mode in _MODES_16 or (mode == "I" and im.format == "PNG"):  # PNG keeps at most 16 bits in "I"
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        raise CorruptDataError(
            f"{path}: {mode} image (32-bit integer or float samples) has no defined 8-bit scaling; "
            "allowed: 8- or 16-bit images"
        )
    return im.convert("RGB")


def read_image(path: Path) -> Any:
    """The image file ``path`` as an RGB PIL image; :class:`CorruptDataError` naming the file when it is not
    a readable image, is truncated, has more than :data:`MAX_IMAGE_PIXELS` pixels or a side ratio over
    :data:`MAX_ASPECT_RATIO` (both checked from the header, before decoding; PIL's own
    ``DecompressionBombError``/``Warning`` are caught as well). 16-bit images are scaled to 8 bits."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise CorruptDataError(
                        f"{path}: {im.width} x {im.height} pixels exceeds the cap of {MAX_IMAGE_PIXELS} "
                        f"(greg.data.base.MAX_IMAGE_PIXELS; a decompression bomb?)"
                    )
                if max(im.size) > MAX_ASPECT_RATIO * max(1, min(im.size)):
                    raise CorruptDataError(
                        f"{path}: {im.width} x {im.height} pixels, side ratio over {MAX_ASPECT_RATIO} "
                        f"(greg.data.base.MAX_ASPECT_RATIO): resizing its shorter side would make it "
                        f"{max(im.size) // max(1, min(im.size))} times as long"
                    )
                return _to_rgb(im, path)
    except CorruptDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptDataError(f"{path}: refused by PIL as a possible decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CorruptDataError(f"{path}: not a readable image or truncated ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Resource:
    """One downloadable file. ``checksum`` is ``"md5:<hex>"`` / ``"sha256:<hex>"``, or ``None`` when no
    published checksum is known: the first download then records its sha256 in ``<root>/checksums.lock.json``
    and every later download is verified against that lock entry."""

    url: str
    filename: str
    checksum: str | None = None
    extract: bool | None = None  # None: decide from the file name (.tar, .tar.gz, .tgz, .zip)

    def __post_init__(self) -> None:
        if self.checksum is not None:
            algo, _, digest = self.checksum.partition(":")
            want = {"md5": 32, "sha256": 64}
            if (
                algo not in want
                or len(digest) != want[algo]
                or not all(c in "0123456789abcdef" for c in digest)
            ):
                raise ValueError(
                    f"resource {self.filename}: checksum must be 'md5:<32 hex>' or 'sha256:<64 hex>', "
                    f"got {self.checksum!r}"
                )

    @property
    def algorithm(self) -> str | None:
        return None if self.checksum is None else self.checksum.split(":", 1)[0]

    @property
    def digest(self) -> str | None:
        return None if self.checksum is None else self.checksum.split(":", 1)[1]

    @property
    def is_archive(self) -> bool:
        if self.extract is not None:
            return self.extract
        return self.filename.endswith((".tar", ".tar.gz", ".tgz", ".zip"))


@dataclass
class RawImages:
    """What a loader returns: either ``images`` (uint8 ``N x H x W x 3``, array-like, may be a memory map)
    or ``files`` (image paths), and ``labels`` (int64, ``-1`` for unlabelled)."""

    labels: np.ndarray
    images: Any = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)


Loader = Callable[["DatasetSpec", str, Path], RawImages]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything known about one dataset.

    ``mean``/``std``/``image_size``/``eval_resize``/``train_aug`` matter when the dataset is the ID set of a
    run; aux/OOD specs carry the values of their benchmark's ID set so ``load(name)`` alone is sensible.
    ``layout`` lists paths (relative to ``<root>/<data_dir>``) that must exist once the resources are
    extracted. ``manual`` holds instructions for licensed data that is never downloaded (ImageNet);
    ``placement_check`` (``(spec, root) -> lines``) checks such data is in place, raising
    ``ManualDownloadRequired`` otherwise (the catalog provides it, so the downloader needs no catalog import).
    ``file_checksums`` maps extracted paths to published digests (re-checked by ``greg data verify``).
    """

    name: str
    role: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    loader: Loader
    splits: tuple[str, ...]
    resources: tuple[Resource, ...] = ()
    layout: tuple[str, ...] = ()
    data_dir: str | None = None
    eval_resize: int | None = None  # shorter side before the center crop; None = image_size
    # "crop_flip" (pad 4 + random crop + flip), "crop_noflip" (the same, no flip: digits) or "rrc_flip"
    # (RandomResizedCrop + flip)
    train_aug: str = "crop_flip"
    # How an OOD set's eval images are brought to the ID size, as the released code does per set
    # (o4lc/Greg-OOD datasets/__init__.py:133-141): "resize_crop" (default; tensor bilinear resize of the shorter
    # side + center crop), "crop" (center crop only, no resize: LSUN-C's 36x36 images), "pil_resize_crop" (PIL
    # bilinear Resize + CenterCrop as torchvision's on PIL images: Textures, Places365).
    eval_geometry: str = "resize_crop"
    benchmark: str | None = None  # the ID dataset this aux/OOD set belongs to
    manual: str | None = None
    source: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # expected number of images per split
    # image files the extracted archives hold under the layout paths (dot-files not counted), checked after
    # extraction; None for sets that are not image folders. Places365: the whole test_256 of which the loader
    # keeps a fixed 10,000.
    archive_images: int | None = None
    # published digests ("md5:<hex>"/"sha256:<hex>") of extracted files, by path under <root>/<data_dir>;
    # checked by `greg data verify` and by loaders that read those files (CIFAR batches)
    file_checksums: dict[str, str] = field(default_factory=dict)
    placement_check: Callable[[DatasetSpec, Path], list[str]] | None = None
    # what every image file of the set measures, checked on a sample at load and on each file read: exact
    # (width, height), or a minimum shorter side; None: not checked
    file_size: tuple[int, int] | None = None
    file_min_side: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"dataset {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.train_aug not in ("crop_flip", "crop_noflip", "rrc_flip"):
            raise ValueError(f"dataset {self.name!r}: unknown train_aug {self.train_aug!r}")

    @property
    def directory(self) -> str:
        return self.data_dir or self.name


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def add(s: DatasetSpec) -> DatasetSpec:
    """Register a spec (the registry stores factories; a spec is its own constant factory)."""
    DATASETS.register(s.name)(lambda: s)
    return s


def spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; ``KeyError`` lists the known names."""
    return DATASETS.create(name)


def weights_path(name: str, root: str | Path) -> Path:
    """Where ``greg data download NAME --root ROOT`` puts the file of a ``weights`` entry (a released
    checkpoint): ``<root>/<data_dir>/<file name>``."""
    s = spec(name)
    if s.role != "weights" or len(s.resources) != 1:
        raise ValueError(
            f"{name!r} is not a released checkpoint (role 'weights'); those are: {names('weights')}"
        )
    return Path(root) / s.directory / s.resources[0].filename


def names(role: str | None = None) -> list[str]:
    """Registered dataset names, optionally only those with ``role`` (``id``/``aux``/``ood``)."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    return [n for n in DATASETS.names() if role is None or spec(n).role == role]


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``C x H x W`` -> shorter side ``size`` (aspect kept; bilinear, antialiased as torchvision)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    return F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]


EVAL_GEOMETRIES = ("resize_crop", "crop", "pil_resize_crop")


def pil_resize_shorter(img: Any, size: int) -> Any:
    """torchvision ``Resize(size)`` on a PIL image: shorter side ``size`` (longer ``int(size * long / short)``),
    PIL bilinear (PIL's own antialiasing filter), what the released code applies to Textures and Places."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    w, h = img.size
    if min(w, h) == size:
        return img
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img.resize((nw, nh), Image.BILINEAR)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return x[..., top : top + size, left : left + size]


def _randint(high: int) -> int:
    """Uniform integer in ``[0, high)`` from torch's global generator."""
    import torch

    return int(torch.randint(0, high, (1,)).item())


def random_crop_flip(x: torch.Tensor, size: int, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Zero-pad ``padding``, take a random ``size`` crop; if ``flip``, flip horizontally with probability 1/2."""
    import torch
    import torch.nn.functional as F

    x = F.pad(x, (padding, padding, padding, padding))
    h, w = x.shape[-2:]
    i, j = _randint(h - size + 1), _randint(w - size + 1)
    x = x[..., i : i + size, j : j + size]
    return x.flip(-1) if flip and torch.rand(1).item() < 0.5 else x


def random_resized_crop_flip(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop (10 tries, then a ratio-clamped center crop) + horizontal flip."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_r[0], log_r[1]).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            i, j = _randint(h - ch + 1), _randint(w - cw + 1)
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        i, j = (h - ch) // 2, (w - cw) // 2
    x = x[..., i : i + ch, j : j + cw]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.flip(-1) if torch.rand(1).item() < 0.5 else x


class ImageTransform:
    """uint8 ``H x W x 3`` array (or PIL image) -> normalized float32 ``3 x S x S``.

    Eval: resize the shorter side to ``eval_resize`` (skipped when it already has that size), center-crop
    ``S``. Train: ``crop_flip`` = eval geometry, then zero-pad 4 + random ``S`` crop + horizontal flip;
    ``crop_noflip`` = the same without the flip (a mirrored digit is another glyph); ``rrc_flip`` =
    RandomResizedCrop(S) + flip. Random draws come from torch's global generator, so a
    seeded trainer (and DataLoader workers, which torch seeds from it) reproduces them. Pure torch: no
    torchvision import (it is slow) and the same arithmetic for arrays and image files.
    """

    def __init__(self, id_spec: DatasetSpec, train: bool = False, geometry: str = "resize_crop"):
        import torch

        if geometry not in EVAL_GEOMETRIES:
            raise ValueError(f"eval_geometry must be one of {EVAL_GEOMETRIES}, got {geometry!r}")
        self.geometry = geometry
        self.size = id_spec.image_size
        self.resize = id_spec.eval_resize or id_spec.image_size
        self.train = train
        self.mode = id_spec.train_aug
        self.mean = torch.tensor(id_spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(id_spec.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Any) -> torch.Tensor:
        import torch

        if self.geometry == "pil_resize_crop" and not self.train:
            img = pil_resize_shorter(img, self.resize)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.train and self.mode == "rrc_flip":
            x = random_resized_crop_flip(x, self.size)
        elif self.geometry != "resize_crop" and not self.train:
            x = center_crop(x, self.size)  # already resized by PIL, or LSUN-C: crop only
        else:
            x = center_crop(resize_shorter(x, self.resize), self.size)
            if self.train:
                x = random_crop_flip(x, self.size, flip=self.mode == "crop_flip")
        return ((x - self.mean) / self.std).contiguous()

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, resize={self.resize}, train={self.train}, mode={self.mode}, "
            f"geometry={self.geometry})"
        )


# A map-style torch Dataset by its protocol (len, getitem): subclassing torch's would import torch with the registry.
class ImageDataset:
    """``(x, y)`` pairs: ``x`` float32 ``3 x S x S`` from :class:`ImageTransform`, ``y`` int (``-1`` = OOD/aux).

    ``raw`` keeps the untransformed images (``raw.images`` uint8 NHWC or ``raw.files``)."""

    def __init__(
        self,
        raw: RawImages,
        transform: ImageTransform,
        *,
        name: str,
        split: str,
        file_size: tuple[int, int] | None = None,
        file_min_side: int | None = None,
    ):
        self.raw = raw
        self.transform = transform
        self.name = name
        self.split = split
        self.labels = np.asarray(raw.labels, dtype=np.int64)
        self.file_size = file_size
        self.file_min_side = file_min_side

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.raw.images is not None:
            img, what = self.raw.images[i], f"{self.name}/{self.split} image {i}"
        else:
            img, what = read_image(self.raw.files[i]), str(self.raw.files[i])
            check_file_size(img.size, what, self.name, self.file_size, self.file_min_side)
        x = self.transform(img)
        want = (self.transform.size, self.transform.size)
        if tuple(x.shape[-2:]) != want:  # else a DataLoader fails with "stack expects each tensor ..."
            h, w = np.asarray(img).shape[:2]
            raise CorruptDataError(
                f"{what}: a {w} x {h} image cannot give the {want[1]} x {want[0]} input with the "
                f"{self.transform.geometry!r} geometry of {self.name!r} (got {x.shape[-1]} x {x.shape[-2]}; "
                f"this set is not resized: each image must be at least {want[1]} x {want[0]})"
            )
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name}/{self.split}, n={len(self)}, {self.transform})"


def check_file_size(
    size: tuple[int, int], what: str, name: str, exact: tuple[int, int] | None, min_side: int | None
) -> None:
    """Raise :class:`CorruptDataError` naming ``what`` when an image of ``size`` (width, height) is not what
    the set ``name`` promises (``exact`` size, or at least ``min_side`` on the shorter side)."""
    w, h = size
    if exact is not None and (w, h) != tuple(exact):
        raise CorruptDataError(
            f"{what}: {w} x {h} pixels, but every image of {name!r} is {exact[0]} x {exact[1]} "
            "(a wrong extraction or another set's folder?)"
        )
    if min_side is not None and min(w, h) < min_side:
        raise CorruptDataError(
            f"{what}: {w} x {h} pixels, but the images of {name!r} are at least {min_side} pixels on each side "
            "(a wrong extraction or another set's folder?)"
        )


#: Files whose size :func:`check_sample` reads (header only) when a set is loaded.
SIZE_SAMPLE = 16


def check_sample(s: DatasetSpec, files: list[Path]) -> None:
    """Check the size of up to :data:`SIZE_SAMPLE` evenly spaced files (first and last included) against
    the spec, from their headers: a mixed-up folder fails at load, before any scoring."""
    if not files or (s.file_size is None and s.file_min_side is None):
        return
    from PIL import Image, UnidentifiedImageError

    for i in sorted(set(np.linspace(0, len(files) - 1, min(SIZE_SAMPLE, len(files))).round().astype(int))):
        try:
            with Image.open(files[i]) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise CorruptDataError(f"{files[i]}: not a readable image ({type(e).__name__}: {e})") from e
        check_file_size(size, str(files[i]), s.name, s.file_size, s.file_min_side)


def subsample(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` distinct items drawn uniformly without replacement (``numpy.random.default_rng(seed)``), kept in
    increasing index order. Returns the dataset itself wrapped in a ``Subset`` with all indices when
    ``len(dataset) <= n``. The returned ``Subset`` records ``indices``, ``seed`` and ``n_total``."""
    from torch.utils.data import Subset

    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}")
    total = len(dataset)
    if total <= n:
        idx = list(range(total))
    else:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).tolist()
    sub = Subset(dataset, idx)
    sub.seed = seed
    sub.n_total = total
    return sub


def load(
    name: str,
    split: str,
    root: str | Path,
    *,
    id_dataset: str | None = None,
    train: bool = False,
    n_max: int | None = None,
    subsample_seed: int = 0,
) -> Dataset:
    """``name``/``split`` as a torch ``Dataset`` of ``(x, y)``, transformed for the ID set ``id_dataset``
    (default: ``name`` itself for an ID set, else the spec's ``benchmark`` ID set, whose statistics the spec
    carries): resized/center-cropped to its image size and normalized with its mean/std.
    ``y`` is the class for the ID set itself and ``-1`` otherwise. ``train=True`` adds the ID training
    augmentation. ``n_max`` (e.g. :data:`N_OOD`) subsamples with :func:`subsample` and ``subsample_seed``.
    """
    s = spec(name)
    if s.role == "weights":
        raise ValueError(
            f"{name!r} is a released checkpoint, not images: pass its file as init.checkpoint "
            f"(`greg data download {name}` puts it under the data root)"
        )
    id_spec = spec(id_dataset or (name if s.role == "id" or s.benchmark is None else s.benchmark))
    if id_spec.role != "id":
        raise ValueError(
            f"id_dataset {id_spec.name!r} has role {id_spec.role!r}; normalization must come from an ID dataset "
            f"({', '.join(names('id'))})"
        )
    if split not in s.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(s.splits)}")
    raw = s.loader(s, split, Path(root))
    if not (s.role == "id" and s.name == id_spec.name):
        raw = RawImages(labels=np.full(len(raw), -1, dtype=np.int64), images=raw.images, files=raw.files)
    if raw.files is not None:
        check_sample(s, raw.files)
    tf = ImageTransform(id_spec, train=train, geometry=s.eval_geometry)
    ds: Dataset = ImageDataset(
        raw, tf, name=name, split=split, file_size=s.file_size, file_min_side=s.file_min_side
    )
    if n_max is not None:
        ds = subsample(ds, n_max, subsample_seed)
    return ds


def list_images(directory: Path) -> list[Path]:
    """Every image file under ``directory`` (recursively), sorted by relative path for a stable order.
    Names starting with a dot (macOS ``._x.jpg`` resource forks, hidden folders) are skipped."""
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory not found: {directory}")
    files = [
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and p.is_file()
    ]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {directory}")
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())
