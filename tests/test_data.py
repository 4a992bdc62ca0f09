"""Dataset registry, transforms, subsampling and the no-network ``tiny`` benchmark."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

import greg.data as gd
from greg.data import base, catalog, tiny

TINY_SETS = [
    "tiny",
    "tiny_m",
    "tiny_aux",
    "tiny_textures",
    "tiny_faces",
    "tiny_photos",
    "tiny_gaussian",
    "tiny_uniform",
]


def _split(name: str) -> str:
    return gd.spec(name).splits[0] if name not in ("tiny", "tiny_m") else "test"


def _raw01(name: str, split: str) -> np.ndarray:
    s = gd.spec(name)
    return np.asarray(s.loader(s, split, None).images, dtype=np.float64) / 255.0


def test_all_tiny_sets_generate_quickly_from_scratch():
    tiny._digits.cache_clear()
    tiny._digits_m.cache_clear()
    tiny.tiny_images.cache_clear()
    t0 = time.perf_counter()
    for name in TINY_SETS:
        for split in gd.spec(name).splits:
            gd.load(name, split, "unused-root")
    elapsed = time.perf_counter() - t0
    # < 2 s on an idle core (about 1 s measured); generous here because CI cores are shared.
    assert elapsed < 8.0, f"generating the tiny benchmark took {elapsed:.1f} s"


@pytest.mark.parametrize("name", TINY_SETS)
def test_tiny_set_shapes_dtypes_labels(name):
    s = gd.spec(name)
    for split in s.splits:
        ds = gd.load(name, split, "unused-root")
        assert len(ds) == s.sizes[split]
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert isinstance(y, int)
        labels = np.array([ds[i][1] for i in range(0, len(ds), 7)])
        if s.role == "id":
            assert labels.min() >= 0 and labels.max() < s.num_classes
        else:
            assert (labels == -1).all()


@pytest.mark.parametrize("name", TINY_SETS)
def test_normalization_uses_the_id_statistics(name):
    split = _split(name)
    raw = _raw01(name, split)
    for id_name in ("tiny", "cifar10"):  # cifar10 only lends its mean/std here: no file is read
        ds = gd.load(name, split, "unused-root", id_dataset=id_name)
        mean = np.array(gd.spec(id_name).mean)
        std = np.array(gd.spec(id_name).std)
        for i in (0, 3, len(ds) - 1):
            x = ds[i][0].numpy().transpose(1, 2, 0)
            np.testing.assert_allclose(x, (raw[i] - mean) / std, atol=2e-6)
    # without id_dataset a tiny OOD set uses its benchmark's (tiny's) statistics, an ID set its own
    x = gd.load(name, split, "unused-root")[0][0].numpy().transpose(1, 2, 0)
    mean, std = (tiny.TINY_M_MEAN, tiny.TINY_M_STD) if name == "tiny_m" else (tiny.TINY_MEAN, tiny.TINY_STD)
    np.testing.assert_allclose(x, (raw[0] - np.array(mean)) / np.array(std), atol=2e-6)


def test_id_set_used_as_ood_has_no_labels():
    ds = gd.load("tiny", "test", "unused-root", id_dataset="cifar10")
    assert {ds[i][1] for i in range(20)} == {-1}


def test_tiny_mean_std_are_those_of_the_train_split():
    s = gd.spec("tiny")
    x = np.asarray(s.loader(s, "train", None).images, dtype=np.float64).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(x.mean(axis=0), tiny.TINY_MEAN, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), tiny.TINY_STD, atol=1e-5)


def test_tiny_split_is_fixed_disjoint_and_stratified():
    s = gd.spec("tiny")
    tr, te = s.loader(s, "train", None), s.loader(s, "test", None)
    assert len(tr) == 1297 and len(te) == 500
    _, digits_y = tiny._load_digits()
    assert len(digits_y) == 1797
    np.testing.assert_array_equal(np.bincount(tr.labels) + np.bincount(te.labels), np.bincount(digits_y))
    per_class = np.bincount(te.labels, minlength=10)
    expected = 500 * np.bincount(digits_y) / 1797
    assert np.abs(per_class - expected).max() <= 1.5
    train_idx, test_idx = tiny.stratified_split(digits_y, 500, seed=0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(np.union1d(train_idx, test_idx)) == 1797
    np.testing.assert_array_equal(digits_y[test_idx], te.labels)


def test_tiny_digits_follow_sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    raw, y = tiny._load_digits()
    np.testing.assert_array_equal(raw, d.images)
    np.testing.assert_array_equal(y, d.target)


def test_tiny_generation_is_deterministic():
    before = {n: _raw01(n, _split(n)).copy() for n in TINY_SETS}
    tiny._digits.cache_clear()
    tiny.tiny_images.cache_clear()
    for n in TINY_SETS:
        np.testing.assert_array_equal(_raw01(n, _split(n)), before[n])


def test_tiny_aux_and_ood_photos_are_disjoint_and_sets_differ():
    assert not set(tiny.AUX_PHOTOS) & set(tiny.OOD_PHOTOS)
    means = {n: _raw01(n, _split(n)).mean() for n in TINY_SETS}
    assert abs(means["tiny_uniform"] - 0.5) < 0.01 and abs(means["tiny_gaussian"] - 0.5) < 0.01
    assert _raw01("tiny_gaussian", "test").std() < _raw01("tiny_uniform", "test").std()  # 0.25 vs 0.29


def test_subsample_is_reproducible_and_recorded():
    ds = gd.load("tiny_aux", "train", "unused-root")
    a, b, c = gd.subsample(ds, 100, seed=3), gd.subsample(ds, 100, seed=3), gd.subsample(ds, 100, seed=4)
    assert a.indices == b.indices and a.indices != c.indices
    assert len(a) == 100 and len(set(a.indices)) == 100 and a.indices == sorted(a.indices)
    assert 0 <= min(a.indices) and max(a.indices) < len(ds)
    assert a.seed == 3 and a.n_total == len(ds)
    expected = np.sort(np.random.default_rng(3).choice(len(ds), size=100, replace=False)).tolist()
    assert a.indices == expected
    assert torch.equal(a[5][0], ds[a.indices[5]][0])
    whole = gd.subsample(ds, 10**6, seed=0)
    assert whole.indices == list(range(len(ds)))
    via_load = gd.load("tiny_aux", "train", "unused-root", n_max=100, subsample_seed=3)
    assert via_load.indices == a.indices
    with pytest.raises(ValueError):
        gd.subsample(ds, 0)
    assert gd.N_OOD == 10000


def test_spec_lookup_and_argument_errors():
    with pytest.raises(KeyError, match="cifar10"):
        gd.spec("cifar-10")
    with pytest.raises(ValueError, match="no split 'val'.*train, test"):
        gd.load("tiny", "val", "unused-root")
    with pytest.raises(ValueError, match="role 'ood'"):
        gd.load("tiny", "test", "unused-root", id_dataset="tiny_faces")
    with pytest.raises(ValueError, match="role"):
        gd.names("weird")
    for role in ("id", "aux", "ood", "weights"):
        assert all(gd.spec(n).role == role for n in gd.names(role))
    assert set(gd.names()) == set().union(*(gd.names(r) for r in ("id", "aux", "ood", "weights")))
    with pytest.raises(ValueError, match="released checkpoint"):
        gd.load("densenet100_cifar10_released", "test", "unused-root")
    with pytest.raises(ValueError, match="not a released checkpoint"):
        gd.weights_path("cifar10", "data")
    with pytest.raises(ValueError, match="checksum"):
        gd.Resource("http://x/y.tar", "y.tar", "md5:abc")
    with pytest.raises(ValueError, match="role"):
        gd.DatasetSpec("x", "test", 0, 32, (0, 0, 0), (1, 1, 1), loader=None, splits=("test",))


def test_registry_contents():
    expected = {
        "cifar10", "cifar100", "random300k", "textures", "svhn", "places365", "lsun_crop", "lsun_resize", "isun",
        "imagenet10", "imagenet990", "inaturalist", "sun", "places", "textures_imagenet", *TINY_SETS,
        "densenet100_cifar10_released", "densenet100_cifar100_released",
    }  # fmt: skip
    assert set(gd.names()) == expected
    assert set(gd.names("id")) == {"cifar10", "cifar100", "imagenet10", "tiny", "tiny_m"}
    for n in gd.names():
        s = gd.spec(n)
        assert s.manual or s.resources or n.startswith("tiny"), n
        for r in s.resources:
            assert r.url.startswith(("http://", "https://")) and r.checksum, (n, r)
        if s.role != "id":
            b = gd.spec(s.benchmark)
            assert (s.mean, s.std, s.image_size) == (b.mean, b.std, b.image_size), n
    assert gd.spec("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert gd.spec("cifar100").std == (0.2673, 0.2564, 0.2762)
    assert gd.spec("textures").resources == gd.spec("textures_imagenet").resources
    assert gd.spec("textures").directory == gd.spec("textures_imagenet").directory == "textures"
    assert catalog.IMAGENET10_WNIDS["n02396427"] == 0 and sorted(catalog.IMAGENET10_WNIDS.values()) == list(
        range(10)
    )


def test_train_augmentation_is_a_padded_crop_or_flip_and_reproducible():
    ev = gd.load("tiny", "train", "unused-root")
    tr = gd.load("tiny", "train", "unused-root", train=True)
    torch.manual_seed(123)
    a = [tr[i][0] for i in range(8)]
    torch.manual_seed(123)
    b = [tr[i][0] for i in range(8)]
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert any(not torch.equal(u, ev[i][0]) for i, u in enumerate(a))
    # each augmented image is one of the 9 x 9 crops of the zero-padded image (zero = 0 before normalization),
    # possibly mirrored
    s = gd.spec("tiny")
    mean, std = torch.tensor(s.mean).view(3, 1, 1), torch.tensor(s.std).view(3, 1, 1)
    for i, u in enumerate(a):
        raw = ev[i][0] * std + mean
        padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
        got = u * std + mean
        candidates = [
            c
            for di in range(9)
            for dj in range(9)
            for c in (padded[:, di : di + 32, dj : dj + 32], padded[:, di : di + 32, dj : dj + 32].flip(-1))
        ]
        assert min(float((got - c).abs().max()) for c in candidates) < 1e-5


def test_eval_geometry_resize_shorter_side_then_center_crop():
    s = gd.spec("tiny")
    t = gd.ImageTransform(s)
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    img[:, 16:48] = 200  # the central 32 columns of the 64-wide image: after 48->32 resize, cols 10.67..32
    x = t(img)
    assert x.shape == (3, 32, 32)
    mean, std = torch.tensor(s.mean).view(3, 1, 1), torch.tensor(s.std).view(3, 1, 1)
    raw = (x * std + mean)[0]
    # resized to 32 x 42 (int(32 * 64 / 48)), center crop starts at column 5: white spans 10.7..32 -> ~5.7..27
    assert raw[:, 8:24].min() > 0.7 and raw[:, :4].max() < 0.05 and raw[:, 29:].max() < 0.05
    const = np.full((100, 70, 3), 51, dtype=np.uint8)
    np.testing.assert_allclose(t(const).numpy(), ((0.2 - mean) / std).expand(3, 32, 32).numpy(), atol=1e-5)


def test_imagenet_transforms_shapes_and_rrc_reproducibility():
    s = gd.spec("imagenet10")
    img = np.random.default_rng(0).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    assert gd.ImageTransform(s)(img).shape == (3, 224, 224)
    tr = gd.ImageTransform(s, train=True)
    torch.manual_seed(7)
    a = tr(img)
    torch.manual_seed(7)
    b = tr(img)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    tall = np.zeros((1000, 20, 3), dtype=np.uint8)  # extreme ratio: all 10 tries fail, center-crop fallback
    assert tr(tall).shape == (3, 224, 224)


def test_dataset_pickles_for_worker_processes():
    ds = gd.load("tiny_faces", "test", "unused-root", n_max=50, subsample_seed=1)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])


def test_dataloader_batches():
    ds = gd.load("tiny", "train", "unused-root", train=True)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


# ------------------------------------------------------------------------------- unreadable image files
def _png_bytes(w: int = 4, h: int = 3) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width x height`` (valid CRC): what a decompression bomb's header says."""
    import struct
    import zlib

    b = bytearray(_png_bytes(1, 1))
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def _files_dataset(*paths) -> base.ImageDataset:
    raw = base.RawImages(labels=np.full(len(paths), -1, dtype=np.int64), files=list(paths))
    return base.ImageDataset(raw, base.ImageTransform(gd.spec("tiny")), name="folder", split="test")


def test_images_over_the_pixel_cap_are_refused_naming_the_file(tmp_path):
    ok, bomb = tmp_path / "ok.png", tmp_path / "ood" / "bomb.png"
    bomb.parent.mkdir()
    ok.write_bytes(_png_bytes())
    bomb.write_bytes(_png_claiming(8192, 8193))  # one row over 8192 x 8192
    ds = _files_dataset(ok, bomb)
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(gd.CorruptDataError) as e:
        ds[1]
    assert str(e.value) == (
        f"{bomb}: 8192 x 8193 pixels exceeds the cap of 67108864 (greg.data.base.MAX_IMAGE_PIXELS; "
        "a decompression bomb?)"
    )
    bomb.write_bytes(_png_claiming(8192, 8192))  # exactly at the cap: decoded (and then found truncated)
    with pytest.raises(gd.CorruptDataError, match="truncated"):
        ds[1]


def test_pil_decompression_bomb_error_and_warning_name_the_file(tmp_path, monkeypatch):
    from PIL import Image

    f = tmp_path / "big.png"
    f.write_bytes(_png_bytes(20, 10))  # 200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 150 < 200 <= 300: PIL warns
    with pytest.raises(gd.CorruptDataError, match=f"^{f}: refused by PIL as a possible decompression bomb"):
        _files_dataset(f)[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 200 > 2 x 50: PIL raises
    with pytest.raises(gd.CorruptDataError, match=f"^{f}: refused by PIL"):
        _files_dataset(f)[0]


def test_truncated_or_non_image_files_name_the_file(tmp_path):
    cut, junk = tmp_path / "cut.png", tmp_path / "junk.jpg"
    cut.write_bytes(_png_bytes(64, 64)[:-200])
    junk.write_bytes(b"not an image at all")
    ds = _files_dataset(cut, junk)
    with pytest.raises(gd.CorruptDataError, match=f"^{cut}: not a readable image or truncated"):
        ds[0]
    with pytest.raises(gd.CorruptDataError, match=f"^{junk}: not a readable image.*UnidentifiedImageError"):
        ds[1]


def test_corrupt_data_error_keeps_its_one_line_message_through_a_dataloader_worker():
    # torch re-raises a worker's exception as type(e)("Caught ... in DataLoader worker ...\nOriginal Traceback...")
    wrapped = (
        "Caught CorruptDataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ngreg.data.base.CorruptDataError: /d/bomb.png: too big\n'
    )
    assert str(gd.CorruptDataError(wrapped)) == "/d/bomb.png: too big"
    assert str(gd.CorruptDataError("/d/a.png: truncated")) == "/d/a.png: truncated"


def _svhn_root(tmp_path, content: bytes, monkeypatch=None):
    import dataclasses
    import hashlib

    d = tmp_path / "svhn"
    d.mkdir(parents=True)
    (d / ".complete").write_text("{}")
    (d / "test_32x32.mat").write_bytes(content)
    if monkeypatch is not None:  # publish this file's md5, so the content check is what fails
        fake = dataclasses.replace(
            gd.spec("svhn"), file_checksums={"test_32x32.mat": f"md5:{hashlib.md5(content).hexdigest()}"}
        )
        monkeypatch.setitem(gd.DATASETS._items, "svhn", lambda: fake)
    return d / "test_32x32.mat"


def test_svhn_is_checked_against_its_md5_on_load(tmp_path):
    mat = _svhn_root(tmp_path, b"MATLAB 5.0 but replaced")
    with pytest.raises(gd.ChecksumError) as e:
        gd.load("svhn", "test", tmp_path)
    msg = str(e.value)
    assert str(mat) in msg and "eb5a983be6a315427106f1b164d9cef3" in msg and "greg data download svhn" in msg
    assert gd.spec("svhn").file_checksums == {"test_32x32.mat": "md5:eb5a983be6a315427106f1b164d9cef3"}


def test_bad_svhn_mat_names_the_file(tmp_path, monkeypatch):
    import io

    from scipy.io import savemat

    mat = _svhn_root(tmp_path / "a", b"\x00" * 300, monkeypatch)
    with pytest.raises(gd.CorruptDataError, match=f"^{mat}: not an SVHN .mat file"):
        gd.load("svhn", "test", tmp_path / "a")
    buf = io.BytesIO()
    savemat(buf, {"X": np.zeros((32, 32, 3), dtype=np.uint8)})  # 3-d: no image axis
    mat = _svhn_root(tmp_path / "b", buf.getvalue(), monkeypatch)
    with pytest.raises(
        gd.CorruptDataError, match=rf"^{mat}: expected 'X' uint8 32 x 32 x 3 x N, got uint8 \(32, 32, 3\)"
    ):
        gd.load("svhn", "test", tmp_path / "b")


def test_ood_eval_geometry_as_released():
    # LSUN-C: 36x36 images are center-cropped to 32, no resize; Textures / Places: PIL bilinear Resize(32) +
    # CenterCrop(32) (o4lc/Greg-OOD datasets/__init__.py:133-140).
    from PIL import Image

    from greg.data import base

    cifar = base.spec("cifar10")
    assert base.spec("lsun_crop").eval_geometry == "crop"
    assert base.spec("textures").eval_geometry == base.spec("places365").eval_geometry == "pil_resize_crop"
    img = np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    x = base.ImageTransform(cifar, geometry="crop")(img)
    mean = np.asarray(cifar.mean, dtype=np.float32).reshape(1, 1, 3)
    std = np.asarray(cifar.std, dtype=np.float32).reshape(1, 1, 3)
    want = (img[2:34, 2:34].astype(np.float32) / 255.0 - mean) / std
    assert np.allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-5)

    tall = np.random.default_rng(1).integers(0, 256, (60, 40, 3), dtype=np.uint8)  # H 60, W 40
    ref = np.asarray(Image.fromarray(tall).resize((32, 48), Image.BILINEAR))[8:40]  # shorter side 32, crop
    x = base.ImageTransform(cifar, geometry="pil_resize_crop")(tall)
    assert np.allclose(x.permute(1, 2, 0).numpy(), (ref.astype(np.float32) / 255.0 - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="eval_geometry"):
        base.ImageTransform(cifar, geometry="bicubic")


# ------------------------------------------------------------------- what an image file must be
def _save(path, arr, **kw):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, **kw).save(path)
    return path


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    v = np.array([[0, 257 * 100, 65535, 300]], dtype=np.uint16)  # 300 / 257 = 1.17 -> 1
    f = _save(tmp_path / "g16.png", v)
    with Image.open(f) as im:
        assert im.mode.startswith("I")  # what PIL's convert("RGB") would clip: 300 -> 255
    got = np.asarray(base.read_image(f))
    assert got.dtype == np.uint8 and got.shape == (1, 4, 3)
    np.testing.assert_array_equal(got[0, :, 0], [0, 100, 255, 1])
    assert (got[..., 0] == got[..., 2]).all()
    rgb8 = _save(tmp_path / "rgb.png", np.full((2, 2, 3), 77, dtype=np.uint8))
    assert (np.asarray(base.read_image(rgb8)) == 77).all()  # 8-bit images unchanged


def test_32_bit_float_images_are_refused_naming_the_file(tmp_path):
    f = _save(tmp_path / "f32.tiff", np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    with pytest.raises(gd.CorruptDataError, match=rf"^{f}: F image \(32-bit integer or float samples\)"):
        base.read_image(f)


def test_an_elongated_image_under_the_pixel_cap_is_refused_before_resizing(tmp_path):
    thin = tmp_path / "thin.png"
    thin.write_bytes(
        _png_claiming(1, 2_000_000)
    )  # 2 Mpx: under the cap; as 32 x 64,000,000 it would be 24 GB
    with pytest.raises(gd.CorruptDataError) as e:
        _files_dataset(thin)[0]
    assert str(e.value) == (
        f"{thin}: 1 x 2000000 pixels, side ratio over 64 (greg.data.base.MAX_ASPECT_RATIO): resizing its shorter "
        "side would make it 2000000 times as long"
    )
    ok = tmp_path / "ok.png"
    ok.write_bytes(_png_bytes(64, 1))  # exactly the largest ratio
    assert _files_dataset(ok)[0][0].shape == (3, 32, 32)


def test_mixed_sizes_in_an_unresized_folder_name_the_file(tmp_path):
    # LSUN-C is center-cropped without a resize: a 20 x 20 image among 36 x 36 ones cannot give 32 x 32
    files = [
        _save(tmp_path / "LSUN" / f"{i}.png", np.zeros((s, s, 3), dtype=np.uint8))
        for i, s in enumerate((36, 20))
    ]
    raw = base.RawImages(labels=np.full(2, -1, dtype=np.int64), files=files)
    ds = base.ImageDataset(
        raw, base.ImageTransform(gd.spec("cifar10"), geometry="crop"), name="lsun_crop", split="test"
    )
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(gd.CorruptDataError) as e:
        torch.utils.data.DataLoader(ds, batch_size=2).__iter__().__next__()
    assert str(e.value) == (
        f"{files[1]}: a 20 x 20 image cannot give the 32 x 32 input with the 'crop' geometry of 'lsun_crop' "
        "(got 6 x 6; this set is not resized: each image must be at least 32 x 32)"
    )


def test_ood_image_sizes_are_checked_against_the_set(tmp_path):
    d = tmp_path / "lsun_resize"
    (d / ".complete").parent.mkdir()
    (d / ".complete").write_text("{}")
    for i in range(20):
        _save(d / "LSUN_resize" / f"{i:02d}.png", np.zeros((32, 32, 3), dtype=np.uint8))
    assert len(gd.load("lsun_resize", "test", tmp_path)) == 20
    bad = _save(d / "LSUN_resize" / "19.png", np.zeros((8, 8, 3), dtype=np.uint8))  # the last: in the sample
    with pytest.raises(gd.CorruptDataError) as e:
        gd.load("lsun_resize", "test", tmp_path)
    assert str(e.value) == (
        f"{bad}: 8 x 8 pixels, but every image of 'lsun_resize' is 32 x 32 (a wrong extraction or another set's "
        "folder?)"
    )
    _save(bad, np.zeros((32, 32, 3), dtype=np.uint8))
    odd = _save(d / "LSUN_resize" / "02.png", np.zeros((8, 8, 3), dtype=np.uint8))  # outside the sample of 16
    ds = gd.load("lsun_resize", "test", tmp_path)
    with pytest.raises(gd.CorruptDataError, match=f"^{odd}: 8 x 8 pixels, but every image"):
        ds[2]  # every file is checked when read
    assert gd.spec("textures").file_min_side == gd.spec("textures_imagenet").file_min_side == 300
    with pytest.raises(gd.CorruptDataError, match="at least 300 pixels on each side"):
        base.check_file_size((299, 640), "x.jpg", "textures", None, 300)
