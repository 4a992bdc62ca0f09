"""The real datasets: CIFAR-10/100 (ID), 300K Random Images (aux), the six CIFAR OOD sets, ImageNet-10 (ID,
licensed, placed by hand), ImageNet-990 (aux) and the four ImageNet OOD sets of MOS (Huang & Li, 2021).

URLs and checksums (see docs/DATASETS.md for the table and their sources):
- CIFAR, SVHN, Places365 ``test_256.tar``, DTD: torchvision's dataset classes (md5; tests/test_download.py
  compares them with the installed torchvision's source).
- LSUN-Crop, LSUN-Resize, iSUN: the tarballs linked from the ODIN code (facebookresearch/odin); md5 as recorded
  by pytorch-ood (``dataset/img/odin.py``) and edadaltocg/detectors (``data/lsun_r_c.py``, ``data/isun.py``).
- 300K Random Images: Outlier-Exposure authors' file; md5 as recorded by pytorch-ood (``tinyimages.py``).
- iNaturalist/SUN/Places (MOS): URLs from the MOS README; md5 as recorded by edadaltocg/detectors (``mos_*.py``).
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from pathlib import Path

import numpy as np

from greg.data.base import CorruptDataError, DatasetSpec, RawImages, Resource, add, list_images, spec
from greg.data.downloader import ManualDownloadRequired, check_file_checksums, require

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: ImageNet-10 (wnid -> label) as in the released GReg code.
IMAGENET10_WNIDS: dict[str, int] = {
    "n02396427": 0, "n04141975": 1, "n02834397": 2, "n02111277": 3, "n03534580": 4,
    "n01877812": 5, "n02837789": 6, "n01443537": 7, "n02114367": 8, "n03857828": 9,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ loaders
def open_npy(path: Path, fix: str = "") -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` after checking the file holds as many bytes as its header promises:
    numpy's own error for a truncated file ("mmap length is greater than file size") names no file.
    Raises :class:`CorruptDataError` naming the file, the header's dtype/shape and both sizes; ``fix`` is
    appended (what to run)."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError names the path
    hint = f"; {fix}" if fix else ""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            shape, _, dtype = read_header[version](f) if version in read_header else (None, None, None)
        except (ValueError, OSError, SyntaxError) as e:  # bad magic / header cut off
            raise CorruptDataError(f"{path} ({size} bytes) is not a readable .npy file: {e}{hint}") from e
        offset = f.tell()
    if shape is not None and not dtype.hasobject:
        need = offset + math.prod(shape) * dtype.itemsize
        if size < need:
            raise CorruptDataError(
                f"{path} is truncated: its header declares {dtype} {tuple(shape)} = {need} bytes "
                f"(header {offset} + data {need - offset}), the file has {size} bytes{hint}"
            )
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as e:
        raise CorruptDataError(f"{path} ({size} bytes) cannot be memory-mapped: {e}{hint}") from e


class LazyNpy:
    """Memory-mapped ``.npy`` opened on first access (and again after pickling into a worker)."""

    def __init__(self, path: Path, fix: str = ""):
        self.path = Path(path)
        self.fix = fix
        self._arr = None

    @property
    def array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = open_npy(self.path, self.fix)
        return self._arr

    def __getitem__(self, i):
        return self.array[i]

    def __len__(self) -> int:
        return len(self.array)

    def __getstate__(self) -> dict:
        return {"path": self.path, "fix": self.fix, "_arr": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"fix": "", **state})


def _fix_hint(s: DatasetSpec, root: Path) -> str:
    return f"run `greg data verify {s.name} --root {root}`, then `greg data download {s.name} --root {root} --force`"


# The python-pickle CIFAR batches, their md5s as published by torchvision (torchvision.datasets.CIFAR10/100
# train_list, test_list, meta; tests/test_data.py checks they match the installed torchvision).
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", {
        "train": {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                  "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                  "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"},
        "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
        "meta": {"batches.meta": "5ff9c542aee3614f3951f8cda6e48888"},
    }),
    "cifar100": ("cifar-100-python", {
        "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        "meta": {"meta": "7973b15100ade9c7d40fb424638fde48"},
    }),
}  # fmt: skip


def _cifar_checksums(name: str) -> dict[str, str]:
    """``{path under the dataset dir: "md5:<hex>"}`` of every CIFAR batch file (for ``DatasetSpec``)."""
    base, groups = _CIFAR_FILES[name]
    return {f"{base}/{f}": f"md5:{md5}" for files in groups.values() for f, md5 in files.items()}


def _cifar(s: DatasetSpec, split: str, root: Path) -> RawImages:
    """The python-pickle batches of ``split``, each checked against its published md5 before it is
    unpickled (as torchvision's ``CIFAR10`` does, but naming the bad file and both digests)."""
    d = require(s, root)
    base, groups = _CIFAR_FILES[s.name]
    rel = [f"{base}/{f}" for f in groups[split]]
    check_file_checksums(s, root, rel)
    data, labels = [], []
    for r in rel:
        try:
            with open(d / r, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            # only reachable when the spec's checksums were replaced (tests) or absent
            raise CorruptDataError(f"{d / r}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    images = np.concatenate(data).transpose(0, 2, 3, 1)  # NCHW -> NHWC (a view, as torchvision's .data)
    return RawImages(labels=np.asarray(labels, dtype=np.int64), images=images)


@functools.lru_cache(maxsize=2)
def _svhn_array(path: str) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        x = loadmat(path)["X"]  # 32 x 32 x 3 x N
    except (MatReadError, ValueError, OSError, KeyError, TypeError, EOFError, NotImplementedError) as e:
        # scipy's messages ("Unknown mat file type", a bare 'X') name no file
        raise CorruptDataError(
            f"{path}: not an SVHN .mat file with an 'X' array ({type(e).__name__}: {e})"
        ) from e
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[:3] == (32, 32, 3)):
        shape = getattr(x, "shape", None)
        raise CorruptDataError(
            f"{path}: expected 'X' uint8 32 x 32 x 3 x N, got {getattr(x, 'dtype', type(x))} {shape}"
        )
    return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))


def _svhn(s: DatasetSpec, split: str, root: Path) -> RawImages:
    d = require(s, root)
    # as CIFAR: a replaced or truncated file is named by its digest, never parsed
    check_file_checksums(s, root, ["test_32x32.mat"])
    x = _svhn_array(str(d / "test_32x32.mat"))
    return RawImages(labels=np.full(len(x), -1, dtype=np.int64), images=x)


def _random300k(s: DatasetSpec, split: str, root: Path) -> RawImages:
    arr = LazyNpy(require(s, root) / "300K_random_images.npy", _fix_hint(s, root))
    a = arr.array
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (32, 32, 3):
        raise CorruptDataError(f"{arr.path}: expected uint8 N x 32 x 32 x 3, got {a.dtype} {a.shape}")
    return RawImages(labels=np.full(len(a), -1, dtype=np.int64), images=arr)


def _folder(subdir: str):
    def loader(s: DatasetSpec, split: str, root: Path) -> RawImages:
        files = list_images(require(s, root) / subdir)
        return RawImages(labels=np.full(len(files), -1, dtype=np.int64), files=files)

    loader.__name__ = f"folder[{subdir}]"
    return loader


#: The released code scores Places365 as ``places365_10k``: ``ImageFolder("../data/test_256/")``, 10,000 images
#: of the Places365 test set (o4lc/Greg-OOD@0c35ddb detect.py:475-477; the name and the folder), as POEM, whose
#: evaluation code it adapts ("We randomly sample 10,000 images from the original test dataset",
#: deeplearning-wisc/poem README). Which 10,000 GReg used is not released; the catalog takes the list of 10,000
#: file names that NTOM/ATOM publish for that protocol (jfc43/informative-outlier-mining@258efed
#: datasets/ood_datasets/places365/test_subset/places365_test_list.txt; POEM's code is adapted from NTOM).
PLACES365_LIST = "places365_test_list.txt"
PLACES365_TEST_IMAGES = 328500


def _places365(s: DatasetSpec, split: str, root: Path) -> RawImages:
    d = require(s, root)
    names = (d / PLACES365_LIST).read_text(encoding="utf-8").split()
    files = [d / "test_256" / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CorruptDataError(
            f"{d / 'test_256'}: {len(missing)} of the {len(files)} images named in {d / PLACES365_LIST} are "
            f"missing (e.g. {missing[0].name}); {_fix_hint(s, root)}"
        )
    return RawImages(labels=np.full(len(files), -1, dtype=np.int64), files=files)


def _class_files(d: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(d) if e.is_file() and not e.name.startswith("."))


def _imagenet10(s: DatasetSpec, split: str, root: Path) -> RawImages:
    check_manual(s, root)
    base = Path(root) / s.directory / ("train" if split == "train" else "val")
    files, labels = [], []
    for wnid, label in sorted(IMAGENET10_WNIDS.items(), key=lambda kv: kv[1]):
        f = _class_files(base / wnid)
        files += f
        labels += [label] * len(f)
    return RawImages(labels=np.asarray(labels, dtype=np.int64), files=files)


def _imagenet990(s: DatasetSpec, split: str, root: Path) -> RawImages:
    check_manual(s, root)
    base = Path(root) / s.directory / "train"
    files: list[Path] = []
    for wnid in sorted(e.name for e in os.scandir(base) if e.is_dir()):
        if wnid not in IMAGENET10_WNIDS:
            files += _class_files(base / wnid)
    return RawImages(labels=np.full(len(files), -1, dtype=np.int64), files=files)


IMAGENET_INSTRUCTIONS = """\
ImageNet (ILSVRC-2012) is licensed and is never downloaded by greg. Get it from https://image-net.org/
(ILSVRC2012_img_train.tar, md5 1d675b47d978889d74fa0da5fadfb00e; ILSVRC2012_img_val.tar,
md5 29b22e2961454d5413ddabcf34fc5622; for torchvision's loader also the devkit
ILSVRC2012_devkit_t12.tar.gz, md5 fa75699e90414af021442c21a62c3abf) and place it as
  {base}/train/<wnid>/*.JPEG   (the 1000 class tars inside the train tar, each extracted into its wnid folder)
  {base}/val/<wnid>/*.JPEG     (the 50000 val images sorted into wnid folders, e.g. with the widely used
                                valprep.sh, or torchvision.datasets.ImageNet(root, split='val') once with
                                ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in root)
imagenet10 uses the 10 wnids {wnids} (train and val);
imagenet990 uses the train images of the other 990 classes.
Then run `greg data verify {name} --root {root}`."""


def check_manual(s: DatasetSpec, root: Path) -> list[str]:
    """Check that the licensed ImageNet files are in place; raise ``ManualDownloadRequired`` otherwise."""
    base = Path(root) / s.directory
    msg = IMAGENET_INSTRUCTIONS.format(base=base, wnids=" ".join(IMAGENET10_WNIDS), name=s.name, root=root)
    problems: list[str] = []
    lines: list[str] = []
    if s.name == "imagenet10":
        for split in ("train", "val"):
            counts = {}
            for wnid in IMAGENET10_WNIDS:
                d = base / split / wnid
                n = len(_class_files(d)) if d.is_dir() else 0
                counts[wnid] = n
                if n == 0:
                    problems.append(f"{d} is missing or empty")
            lines.append(
                f"{split}: {sum(counts.values())} images in {sum(v > 0 for v in counts.values())}/10 classes"
            )
    else:
        train = base / "train"
        others = (
            [e.name for e in os.scandir(train) if e.is_dir() and e.name not in IMAGENET10_WNIDS]
            if train.is_dir()
            else []
        )
        if len(others) < 990:
            problems.append(f"{train} has {len(others)} non-ImageNet-10 class folders, expected 990")
        lines.append(f"train: {len(others)} auxiliary class folders")
    if problems:
        shown = "\n  ".join(problems[:5]) + (
            f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ManualDownloadRequired(f"{s.name}: ImageNet files not in place:\n  {shown}\n\n{msg}")
    return [f"{s.name}: {line}" for line in lines]


# ------------------------------------------------------------------------------------------------ entries
_CIFAR_OOD = {
    "role": "ood", "num_classes": 0, "image_size": 32, "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
    "splits": ("test",), "benchmark": "cifar10",
}  # fmt: skip
_IMAGENET_OOD = {
    "role": "ood", "num_classes": 0, "image_size": 224, "eval_resize": 256, "train_aug": "rrc_flip",
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "splits": ("test",), "benchmark": "imagenet10",
}  # fmt: skip
# DTD's images measure 300x300 to 640x640 (Cimpoi et al. 2014, the dataset page).
DTD_MIN_SIDE = 300
_DTD = Resource(
    "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
    "dtd-r1.0.1.tar.gz",
    "md5:fff73e5086ae6bdbea199a49dfb8a4c1",
)

add(DatasetSpec(
    name="cifar10", role="id", num_classes=10, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    loader=_cifar, splits=("train", "test"),
    resources=(Resource("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                        "md5:c58f30108f718f92721af3b95e74349a"),),
    layout=("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"),
    file_checksums=_cifar_checksums("cifar10"),
    source="CIFAR-10 (Krizhevsky 2009), via torchvision's URL/md5", sizes={"train": 50000, "test": 10000},
))  # fmt: skip
add(DatasetSpec(
    name="cifar100", role="id", num_classes=100, image_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD,
    loader=_cifar, splits=("train", "test"),
    resources=(Resource("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                        "md5:eb9058c3a382ffc7106e4002c42a8d85"),),
    layout=("cifar-100-python/train", "cifar-100-python/test"),
    file_checksums=_cifar_checksums("cifar100"),
    source="CIFAR-100 (Krizhevsky 2009), via torchvision's URL/md5", sizes={"train": 50000, "test": 10000},
))  # fmt: skip
add(DatasetSpec(
    name="random300k", role="aux", num_classes=0, image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    loader=_random300k, splits=("train",), benchmark="cifar10",
    resources=(Resource("https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy",
                        "300K_random_images.npy", "md5:64ca64357de98351f28454274a112dc3"),),
    layout=("300K_random_images.npy",),
    source="300K Random Images (Hendrycks et al., Outlier Exposure), uint8 300000x32x32x3, memory-mapped",
    sizes={"train": 300000},
))  # fmt: skip
add(DatasetSpec(
    name="textures", loader=_folder("dtd/images"), resources=(_DTD,), layout=("dtd/images",),
    source="Describable Textures Dataset (Cimpoi et al. 2014), all 5640 images", sizes={"test": 5640},
    archive_images=5640, file_min_side=DTD_MIN_SIDE, eval_geometry="pil_resize_crop", **_CIFAR_OOD,
))  # fmt: skip
add(DatasetSpec(
    name="svhn", loader=_svhn,
    resources=(Resource("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
                        "md5:eb5a983be6a315427106f1b164d9cef3"),),
    layout=("test_32x32.mat",), file_checksums={"test_32x32.mat": "md5:eb5a983be6a315427106f1b164d9cef3"},
    source="SVHN test split (Netzer et al. 2011), via torchvision's URL/md5",
    sizes={"test": 26032}, **_CIFAR_OOD,
))  # fmt: skip
add(DatasetSpec(
    name="places365", loader=_places365,
    resources=(Resource("http://data.csail.mit.edu/places/places365/test_256.tar", "test_256.tar",
                        "md5:f532f6ad7b582262a2ec8009075e186b"),
               Resource("https://raw.githubusercontent.com/jfc43/informative-outlier-mining/"
                        f"258efede70c778bf6e9e528869b2cab58b071e3e/datasets/ood_datasets/places365/test_subset/{PLACES365_LIST}",
                        PLACES365_LIST, "sha256:e992c94b23b7416e8f71c0cab87b777b0e7022ee1b4aeed19d5b16ddf1b90578")),
    layout=("test_256", PLACES365_LIST),
    source="Places365-Standard test images, 256x256 (Zhou et al. 2017): the 10,000 of 328,500 named by NTOM's "
           "list, as the released places365_10k (detect.py:475-477)",
    sizes={"test": 10000}, archive_images=PLACES365_TEST_IMAGES, file_size=(256, 256),
    eval_geometry="pil_resize_crop",
    **_CIFAR_OOD,
))  # fmt: skip
add(DatasetSpec(
    name="lsun_crop", loader=_folder("LSUN"),
    resources=(Resource("https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz?dl=1", "LSUN.tar.gz",
                        "md5:458a0a0ab8e5f1cb4516d7400568e460"),),
    layout=("LSUN",), source="LSUN crop, as distributed with the ODIN code (Liang et al. 2018)",
    sizes={"test": 10000}, archive_images=10000, file_size=(36, 36), eval_geometry="crop", **_CIFAR_OOD,
))  # fmt: skip
add(DatasetSpec(
    name="lsun_resize", loader=_folder("LSUN_resize"),
    resources=(Resource("https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1", "LSUN_resize.tar.gz",
                        "md5:278b7b31c8cb7e804a1465a8ce03a2dc"),),
    layout=("LSUN_resize",), source="LSUN resize, as distributed with the ODIN code (Liang et al. 2018)",
    sizes={"test": 10000}, archive_images=10000, file_size=(32, 32), **_CIFAR_OOD,
))  # fmt: skip
add(DatasetSpec(
    name="isun", loader=_folder("iSUN"),
    resources=(Resource("https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz?dl=1", "iSUN.tar.gz",
                        "md5:be77b0f2c26fda898afac5f99645ee70"),),
    layout=("iSUN",), source="iSUN, as distributed with the ODIN code (Liang et al. 2018)",
    sizes={"test": 8925}, archive_images=8925, file_size=(32, 32), **_CIFAR_OOD,
))  # fmt: skip

add(DatasetSpec(
    name="imagenet10", role="id", num_classes=10, image_size=224, eval_resize=256, train_aug="rrc_flip",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, loader=_imagenet10, splits=("train", "test"), data_dir="imagenet",
    manual=IMAGENET_INSTRUCTIONS, placement_check=check_manual,
    source="ILSVRC-2012, 10 classes of the released GReg code (test = the official val images)",
    sizes={"test": 500},
))  # fmt: skip
add(DatasetSpec(
    name="imagenet990", role="aux", num_classes=0, image_size=224, eval_resize=256, train_aug="rrc_flip",
    mean=IMAGENET_MEAN, std=IMAGENET_STD, loader=_imagenet990, splits=("train",), data_dir="imagenet",
    manual=IMAGENET_INSTRUCTIONS, placement_check=check_manual, benchmark="imagenet10",
    source="ILSVRC-2012 train images of the 990 classes not in ImageNet-10 (auxiliary outliers)",
))  # fmt: skip
_MOS = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/"
for _name, _file, _md5, _dir in (
    ("inaturalist", "iNaturalist.tar.gz", "5be6ea8aa027d7b631916427b32cb335", "iNaturalist"),
    ("sun", "SUN.tar.gz", "8469c3ada62211477954ec1be53b12d0", "SUN"),
    ("places", "Places.tar.gz", "b5cb5eba2754ae2a28beea8718db699a", "Places"),
):
    add(DatasetSpec(
        name=_name, loader=_folder(f"{_dir}/images"), resources=(Resource(_MOS + _file, _file, f"md5:{_md5}"),),
        layout=(f"{_dir}/images",), source=f"{_dir} OOD subset for ImageNet of MOS (Huang & Li 2021)",
        sizes={"test": 10000}, archive_images=10000, **_IMAGENET_OOD,
    ))  # fmt: skip
add(DatasetSpec(
    name="textures_imagenet", loader=_folder("dtd/images"), resources=(_DTD,), layout=("dtd/images",),
    data_dir="textures", source="DTD, all 5640 images, at ImageNet resolution (as in MOS)", sizes={"test": 5640},
    archive_images=5640, file_min_side=DTD_MIN_SIDE, **_IMAGENET_OOD,
))  # fmt: skip


# ------------------------------------------------------------------------------------ released checkpoints
def _weights(s: DatasetSpec, split: str, root: Path) -> RawImages:
    raise ValueError(f"{s.name!r} is a released checkpoint, not images")


# The two DenseNet-BC-100 checkpoints the GReg authors committed to o4lc/Greg-OOD (commit 2b0d8c0, removed from
# the tree in a later cleanup; the raw URLs of that commit stay valid). sha256 of the files as recovered from
# that commit. mean/std/num_classes: what the weights expect (the ID set's normalization, docs/DATASETS.md).
_GREG_OOD_RAW = "https://github.com/o4lc/Greg-OOD/raw/2b0d8c021c072ef8b7d5ff6b1e5bc81c8700bbd7/models/"
for _id, _file, _blob, _sha in (
    ("cifar10", "densenet100_cifar10.pth", "cifar10DensenetPretrained.pth",
     "deaefd082911a1c6c92aacdcfecf03c71b932acc5c08b779c85c44eccdc0c817"),
    ("cifar100", "densenet100_cifar100.pth", "baseline_100.pth",
     "7f18c6f76cf1696ffca0178f1086173d561de0ddadbfad8e00f3f83d4ab2baf9"),
):  # fmt: skip
    _id_spec = spec(_id)
    add(DatasetSpec(
        name=f"densenet100_{_id}_released", role="weights", num_classes=_id_spec.num_classes, image_size=32,
        mean=_id_spec.mean, std=_id_spec.std, loader=_weights, splits=(), benchmark=_id,
        resources=(Resource(_GREG_OOD_RAW + _blob, _file, f"sha256:{_sha}"),), layout=(_file,),
        source=f"DenseNet-BC-100 trained with CE on {_id} by the GReg authors (o4lc/Greg-OOD models/{_blob})",
    ))  # fmt: skip
