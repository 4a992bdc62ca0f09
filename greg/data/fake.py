"""Format-faithful fake datasets: ``greg data fake --root DIR`` (rehearse the real grid without 100+ GB).

For every catalog entry this writes the file the real download delivers -- same file name, archive type, inner
layout, pickle keys / MATLAB variables / array dtype and shape, image sizes and modes -- but with few images,
plus the hand-placed files (ImageNet folders, torchvision's DenseNet-121 weights):

``DIR/serve/``
    one file per catalog resource, under its catalog file name (serve it with any HTTP server and pass its URL
    as ``--url-base``; or use it as ``--mirror``), and ``checksums.sha256``: the digests of these fakes in
    ``sha256sum`` format, named ``<dataset dir>/<file>`` (``greg data download --checksums``; downloaded files
    and the extracted files whose published digests the catalog checks). The real catalog is never changed.
``DIR/data/``
    a data root holding what a user places by hand: ``imagenet/{train,val}/<wnid>/*.JPEG`` (the 10 ID classes
    and the 990 others) and ``pretrained/densenet121-a639ec97.pth``.

Counts keep the real sets' ratios where the method depends on them: the auxiliary pool over the ID train set
sets GReg+'s candidates per step (``floor(pool / n_id * batch)``), so the fakes give 384 per step on CIFAR at
batch 64 (as the real 300000 / 50000) and 1584 on ImageNet-10 at batch 32 (real: 1476). Everything is drawn
from ``seed``: two runs write byte-identical files (archives carry fixed mtimes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from greg.data.base import DatasetSpec, names, spec
from greg.data.catalog import IMAGENET10_WNIDS
from greg.io import atomic_open, atomic_path, atomic_write_text

SERVE, DATA = "serve", "data"
CHECKSUMS = "checksums.sha256"
#: torchvision's ImageNet-1k DenseNet-121 file (the name config/config.yaml's ImageNet pretraining expects).
DENSENET121_FILE = "pretrained/densenet121-a639ec97.pth"
MTIME = 1_262_304_000  # 2010-01-01: fixed, so archives are byte-identical across runs

# Per-set counts (few images; see the module doc for the ratios they keep).
CIFAR_TRAIN_PER_BATCH = 64  # 5 batches = 320 train images (CIFAR-100: one `train` file of 320)
CIFAR_TEST = 100
RANDOM300K = 1920  # 320 * 6: 300000 / 50000 = 6 aux images per ID image
OOD_IMAGES = 60
IMAGENET_ID_TRAIN = 8  # per class: 80 ID images, at least the largest ImageNet batch (DOS: 64)
IMAGENET_ID_VAL = 5  # per class: 50 (real: 50 per class)
IMAGENET_AUX_TRAIN = 4  # per class: 3960 (pool / n_id = 49.5; real 600000 / 13000 = 46.2)

# The 47 DTD categories (dtd-r1.0.1, images/<category>/<category>_<n>.jpg).
DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged"]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ------------------------------------------------------------------------------------------------ images
def _pixels(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random colour image (compresses like a photograph, unlike white noise), uint8 h x w x 3."""
    from PIL import Image

    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-8, 9, size=img.shape, dtype=np.int16)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _jpeg(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    im = Image.fromarray(_pixels(rng, w, h))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _image_array(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    return np.stack([_pixels(rng, size, size) for _ in range(n)]) if n else np.zeros((0, size, size, 3), np.uint8)


# ------------------------------------------------------------------------------------------------ archives
class _Tar:
    """A tar archive built in memory with fixed metadata (reproducible bytes)."""

    def __init__(self, path: Path, compress: bool):
        self.path, self.compress = path, compress
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115  (close())
        self.dirs: set[str] = set()

    def _dir(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                self.tar.addfile(info)

    def add(self, name: str, data: bytes) -> None:
        self._dir(name)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, MTIME
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        data = self.buf.getvalue()
        if self.compress:
            out = io.BytesIO()
            with gzip.GzipFile(fileobj=out, mode="wb", mtime=MTIME, filename="") as g:
                g.write(data)
            data = out.getvalue()
        _write(self.path, data)


def _open_tar(out: Path, filename: str) -> _Tar:
    return _Tar(out / filename, compress=filename.endswith((".gz", ".tgz")))


def _write(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ writers
# Each writer: (spec, serve dir, rng) -> {path under <root>/<data_dir>: sha256} of the extracted files whose
# published digests the catalog checks (file_checksums), so the fakes' checksum file can replace them.
Writer = Callable[[DatasetSpec, Path, np.random.Generator], dict[str, str]]


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label: str, cifar100: bool) -> dict:
    x = _image_array(rng, n).transpose(0, 3, 1, 2).reshape(n, 3072)  # rows: R plane, G plane, B plane
    labels = [int(i % num_classes) for i in rng.permutation(n)]
    entry: dict = {"batch_label": label}
    if cifar100:
        entry |= {"fine_labels": labels, "coarse_labels": [v // 5 for v in labels]}
    else:
        entry["labels"] = labels
    entry["data"] = np.ascontiguousarray(x, dtype=np.uint8)
    entry["filenames"] = [f"fake_{label.replace(' ', '_')}_{i:05d}.png" for i in range(n)]
    return entry


def _cifar(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    c100 = s.num_classes == 100
    base = "cifar-100-python" if c100 else "cifar-10-batches-py"
    files: dict[str, dict] = {}
    if c100:
        files["train"] = _cifar_batch(rng, 5 * CIFAR_TRAIN_PER_BATCH, 100, "training batch 1 of 1", True)
        files["test"] = _cifar_batch(rng, CIFAR_TEST, 100, "testing batch 1 of 1", True)
        files["meta"] = {
            "fine_label_names": [f"class_{i:03d}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)],
        }
    else:
        for k in range(1, 6):
            files[f"data_batch_{k}"] = _cifar_batch(rng, CIFAR_TRAIN_PER_BATCH, 10, f"training batch {k} of 5", False)
        files["test_batch"] = _cifar_batch(rng, CIFAR_TEST, 10, "testing batch 1 of 1", False)
        files["batches.meta"] = {"num_cases_per_batch": 10000, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    t = _open_tar(out, s.resources[0].filename)
    digests = {}
    for name, obj in files.items():
        data = pickle.dumps(obj, protocol=2)  # the real batches are Python 2 pickles
        t.add(f"{base}/{name}", data)
        digests[f"{base}/{name}"] = _digest(data)
    if not c100:
        t.add(f"{base}/readme.html", b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; url=http://www.cs.toronto.edu/~kriz/cifar.html\">\n")
    t.close()
    return {k: v for k, v in digests.items() if k in s.file_checksums}


def _svhn(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    from scipy.io import savemat

    x = _image_array(rng, OOD_IMAGES).transpose(1, 2, 3, 0)  # H x W x C x N, as the real file
    y = (rng.integers(0, 10, size=(OOD_IMAGES, 1)) + 1).astype(np.uint8)  # 1..10, 10 = digit 0
    buf = io.BytesIO()
    savemat(buf, {"X": np.ascontiguousarray(x), "y": y}, format="5")
    data = buf.getvalue()
    name = s.resources[0].filename
    _write(out / name, data)
    return {name: _digest(data)} if name in s.file_checksums else {}


def _random300k(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    with atomic_open(out / s.resources[0].filename, "wb") as f:
        np.save(f, _image_array(rng, RANDOM300K), allow_pickle=False)
    return {}


def _dtd(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    t = _open_tar(out, s.resources[0].filename)
    listed = []
    for c in DTD_CLASSES:
        for i in range(2):  # real: 120 per category, 300x300 to 640x640
            w, h = (int(v) for v in rng.integers(300, 641, size=2))
            name = f"{c}_{i + 1:04d}.jpg"
            t.add(f"dtd/images/{c}/{name}", _jpeg(rng, w, h))
            listed.append(f"{c}/{name}")
    for split in ("train1", "val1", "test1"):
        t.add(f"dtd/labels/{split}.txt", ("\n".join(listed) + "\n").encode())
    t.add("dtd/labels/labels_joint_anno.txt", ("\n".join(f"{p} {p.split('/')[0]}" for p in listed) + "\n").encode())
    t.close()
    return {}


def _folder_tar(pattern: str, sizes: Callable[[np.random.Generator], tuple[int, int]], modes=("RGB",)) -> Writer:
    """An archive of ``OOD_IMAGES`` JPEGs at ``pattern.format(i=...)`` (relative to the extraction dir);
    ``{dir}`` in the pattern is the catalog's layout directory, so a change of split there is followed."""

    def write(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
        t = _open_tar(out, s.resources[0].filename)
        d = s.layout[0]
        for i in range(OOD_IMAGES):
            w, h = s.file_size or sizes(rng)  # the catalog's own size check, when it has one
            t.add(pattern.format(dir=d, split=d.split("_")[0], i=i + 1), _jpeg(rng, w, h, modes[i % len(modes)]))
        t.close()
        return {}

    return write


def _places365(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    """``test_256.tar`` (``test_256/Places365_test_<8 digits>.jpg``, 256 x 256) and the list of the images
    scored (the catalog's second resource; real: 10,000 of 328,500 names, one per line): here 50 of 60."""
    _folder_tar("{dir}/Places365_{split}_{i:08d}.jpg", _fixed(256, 256))(s, out, rng)
    picked = sorted(int(i) + 1 for i in rng.choice(OOD_IMAGES, size=OOD_IMAGES - 10, replace=False))
    _write(out / s.resources[1].filename, "".join(f"Places365_test_{i:08d}.jpg\n" for i in picked).encode())
    return {}


def _fixed(w: int, h: int) -> Callable[[np.random.Generator], tuple[int, int]]:
    return lambda rng: (w, h)


def _photo(rng: np.random.Generator) -> tuple[int, int]:
    """Sizes as photographs come: mostly 4:3 / 3:4 around 500 px, some odd ones."""
    choices = ((500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (333, 500), (257, 193), (1024, 683))
    return choices[int(rng.integers(len(choices)))]


def _weights(s: DatasetSpec, out: Path, rng: np.random.Generator) -> dict[str, str]:
    """The released DenseNet-BC-100 file: the real key names and wrapping, random values. CIFAR-10's is
    ``{epoch, state_dict}`` with an ``fc`` head; CIFAR-100's ``{epoch, arch, state_dict, cla_acc}`` with
    DataParallel's ``module.`` prefix and a ``linear`` head (the files the GReg authors committed)."""
    import torch

    from greg import models

    torch.manual_seed(int(rng.integers(2**31)))
    model = models.create("densenet100", num_classes=s.num_classes)
    head = "fc." if s.num_classes == 10 else "linear."
    sd = {(head + k[5:] if k.startswith("head.") else k): v for k, v in model.state_dict().items()}
    if s.num_classes == 10:
        obj = {"epoch": 100, "state_dict": sd}
    else:
        obj = {"epoch": 100, "arch": "densenet101", "state_dict": {f"module.{k}": v for k, v in sd.items()},
               "cla_acc": 0.0}
    with atomic_path(out / s.resources[0].filename) as tmp:
        torch.save(obj, tmp)
    return {}


#: How each downloadable catalog entry is faked (a new catalog entry without one fails tests/test_rehearsal.py).
WRITERS: dict[str, Writer] = {
    "cifar10": _cifar,
    "cifar100": _cifar,
    "random300k": _random300k,
    "svhn": _svhn,
    "textures": _dtd,
    "textures_imagenet": _dtd,
    "places365": _places365,
    "lsun_crop": _folder_tar("{dir}/test/{i}.jpg", _fixed(36, 36)),  # ODIN's LSUN crop: 36 x 36
    "lsun_resize": _folder_tar("{dir}/LSUN_resize/{i}.jpg", _fixed(32, 32)),
    "isun": _folder_tar("{dir}/iSUN_patches/{i:06d}.jpeg", _fixed(32, 32)),
    "inaturalist": _folder_tar("{dir}/{i:032x}.jpg", _photo),
    "sun": _folder_tar("{dir}/sun_{i:013x}.jpg", _photo),
    "places": _folder_tar("{dir}/b_{i:08d}.jpg", _photo, modes=("RGB", "RGB", "L")),
    "densenet100_cifar10_released": _weights,
    "densenet100_cifar100_released": _weights,
}


# ------------------------------------------------------------------------------------------------ ImageNet
def _imagenet(data: Path, rng: np.random.Generator) -> int:
    """``data/imagenet/{train,val}/<wnid>/*.JPEG``: the 10 ID classes (train + val) and 990 other wnids
    (train), with the real ImageNet's oddities: grayscale and CMYK JPEGs, small and large images."""
    base = data / "imagenet"
    others = [f"n{9000000 + i:08d}" for i in range(990)]  # fake wnids, disjoint from the ten real ones
    n = 0
    for split, wnids, per in (
        ("train", list(IMAGENET10_WNIDS), IMAGENET_ID_TRAIN),
        ("val", list(IMAGENET10_WNIDS), IMAGENET_ID_VAL),
        ("train", others, IMAGENET_AUX_TRAIN),
    ):
        for wnid in wnids:
            d = base / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                mode = ("L", "CMYK")[n % 2] if n % 11 == 0 else "RGB"
                w, h = _photo(rng) if n % 23 else ((75, 56), (1600, 1200))[n % 2]
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{n + 1:08d}.JPEG"
                _write(d / name, _jpeg(rng, w, h, mode))
                n += 1
    return n


def _densenet121(data: Path) -> None:
    """torchvision's DenseNet-121 ImageNet file as published in 2017: legacy (non-zip) serialization, the
    old ``norm.1`` / ``conv.1`` key style, no ``num_batches_tracked``; random values."""
    import re

    import torch
    import torchvision

    torch.manual_seed(0)
    sd = torchvision.models.densenet121(weights=None).state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")
    }
    path = data / DENSENET121_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(legacy, tmp, _use_new_zipfile_serialization=False)


# ------------------------------------------------------------------------------------------------ entry
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def faked_names() -> list[str]:
    """The catalog entries that have a download (every one gets a fake)."""
    return [n for n in names() if spec(n).resources]


def fakes_complete(root: str | Path) -> bool:
    """Whether ``root`` holds fakes of the current catalog: its checksum file names every downloadable file
    and those files exist (a catalog entry added or changed since they were written makes this False)."""
    out = Path(root) / SERVE
    path = out / CHECKSUMS
    if not path.is_file() or not (Path(root) / DATA / DENSENET121_FILE).is_file():
        return False
    listed = path.read_text(encoding="utf-8")
    for name in faked_names():
        s = spec(name)
        for r in s.resources:
            if f"  {s.directory}/{r.filename}\n" not in listed or not (out / r.filename).is_file():
                return False
    return True


def write_fakes(root: str | Path, *, seed: int = 0, imagenet: bool = True, progress: bool = True) -> Path:
    """Write the fakes under ``root`` (module doc); returns the checksum file. Idempotent: rewrites all."""
    root = Path(root)
    out, data = root / SERVE, root / DATA
    out.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    lines: dict[str, str] = {}  # "<dir>/<file>" -> sha256
    written: dict[str, dict[str, str]] = {}  # file name -> extracted digests (a file shared by two entries)
    for i, name in enumerate(faked_names()):
        s = spec(name)
        if name not in WRITERS:
            raise KeyError(f"no fake writer for catalog entry {name!r} (greg.data.fake.WRITERS)")
        key = s.resources[0].filename
        if key not in written:
            if progress:
                print(f"fake: {name} -> {out / key}")
            written[key] = WRITERS[name](s, out, np.random.default_rng([seed, i]))
        for r in s.resources:
            lines[f"{s.directory}/{r.filename}"] = _sha256(out / r.filename)
        lines |= {f"{s.directory}/{rel}": d for rel, d in written[key].items()}
    if imagenet:
        n = _imagenet(data, np.random.default_rng([seed, 1000]))
        _densenet121(data)
        if progress:
            print(f"fake: {n} ImageNet JPEGs and {DENSENET121_FILE} under {data}")
    path = out / CHECKSUMS
    header = "# sha256 of the fakes written by `greg data fake` (NOT the real datasets)\n"
    atomic_write_text(path, header + "".join(f"{d}  {n}\n" for n, d in sorted(lines.items())))
    return path


# ------------------------------------------------------------------------------------------------ serving
def server(directory: str | Path, port: int = 0):
    """A threading HTTP server of ``directory`` on 127.0.0.1 (``port`` 0: a free one), answering ``Range:
    bytes=N-`` with 206 as the real hosts do (so ``greg data download`` resumes a partial file). Bound, not yet
    serving: call ``serve_forever`` (e.g. in a daemon thread); its URL is :func:`url_of`."""
    import functools
    import http.server
    import os

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def send_head(self):
            rng = self.headers.get("Range", "")
            path = self.translate_path(self.path)
            if not rng.startswith("bytes=") or not os.path.isfile(path):
                return super().send_head()
            start_text, _, end_text = rng[len("bytes="):].partition("-")
            size = os.path.getsize(path)
            if not start_text.isdigit() or end_text or int(start_text) >= size:
                self.send_error(416, "Requested Range Not Satisfiable")
                return None
            start = int(start_text)
            f = open(path, "rb")  # noqa: SIM115  (closed by the base class after copyfile)
            f.seek(start)
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            return f

    Path(directory).mkdir(parents=True, exist_ok=True)
    handler = functools.partial(Handler, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    srv.daemon_threads = True
    return srv


def url_of(srv) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}"
