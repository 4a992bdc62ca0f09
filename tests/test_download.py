"""Downloads against archives served from 127.0.0.1: verification, markers, lock file, truncation, resume,
the ImageNet placement check and the ``greg data`` CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import greg.data as gd
from greg.cli import main as greg_main
from greg.data import catalog, downloader
from greg.data.base import DATASETS, ImageDataset, ImageTransform


# ------------------------------------------------------------------------------------------- the server
class FileServer:
    """Serves ``files`` (name -> bytes) with HTTP Range support; names in ``truncate`` are cut in half
    (the full Content-Length is announced, then the connection closes)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self.content_type: dict[str, str] = {}  # name -> Content-Type header
        self.trickle: dict[
            str, tuple[int, float]
        ] = {}  # name -> (bytes sent at once, then 1 byte per delay s)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                rng = self.headers.get("Range")
                owner.requests.append((name, rng))
                if name not in owner.files:
                    self.send_error(404)
                    return
                data, start = owner.files[name], 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if name in owner.content_type:
                    self.send_header("Content-Type", owner.content_type[name])
                self.end_headers()
                if name in owner.trickle:
                    head, delay = owner.trickle[name]
                    try:
                        self.wfile.write(body[:head])
                        self.wfile.flush()
                        for i in range(head, len(body)):
                            time.sleep(delay)
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                    except OSError:  # the client gave up
                        pass
                    self.close_connection = True
                    return
                if name in owner.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def close(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(downloader.URL_BASE_ENV, raising=False)
    s = FileServer()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------- test archives
def _png(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {f"fake/images/{c}/{i}.png": _png(i + 10 * k) for k, c in enumerate("ab") for i in range(3)}


def _targz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in IMAGES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in IMAGES.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(5 * 32 * 32 * 3, dtype=np.uint8).reshape(5, 32, 32, 3))
    return buf.getvalue()


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _spec(name, url, filename, checksum, *, layout=("fake/images",), loader=None) -> gd.DatasetSpec:
    return gd.DatasetSpec(
        name=name, role="ood", num_classes=0, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
        loader=loader or catalog._folder("fake/images"), splits=("test",), benchmark="tiny",
        resources=(gd.Resource(url, filename, checksum),), layout=layout,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- success
def test_targz_download_verifies_extracts_marks_and_second_run_is_offline(server, tmp_path):
    blob = _targz()
    server.files["fake.tar.gz"] = blob
    s = _spec("fake_tgz", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(blob)}")
    d = gd.download(s, tmp_path, progress=False)
    assert d == tmp_path / "fake_tgz"
    marker = json.loads((d / ".complete").read_text())
    assert marker["files"] == {"fake.tar.gz": f"sha256:{_sha256(blob)}"}
    for name, data in IMAGES.items():
        assert (d / name).read_bytes() == data
    assert not (d / "fake.tar.gz.part").exists()
    raw = s.loader(s, "test", tmp_path)
    assert [p.relative_to(d).as_posix() for p in raw.files] == sorted(IMAGES)
    ds = ImageDataset(raw, ImageTransform(gd.spec("tiny")), name=s.name, split="test")
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == -1
    assert gd.verify(s, tmp_path)[-1].startswith("layout OK")

    n_requests = len(server.requests)
    server.close()  # the second run must not touch the network
    assert gd.download(s, tmp_path, progress=False) == d
    assert len(server.requests) == n_requests == 1


def test_zip_download_with_md5(server, tmp_path):
    blob = _zip()
    server.files["fake.zip"] = blob
    s = _spec("fake_zip", server.url("fake.zip"), "fake.zip", f"md5:{hashlib.md5(blob).hexdigest()}")
    d = gd.download(s, tmp_path, progress=False)
    assert (d / ".complete").is_file()
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*.png")) == sorted(IMAGES)


def test_npy_via_url_base_argument_and_environment(server, tmp_path, monkeypatch):
    blob = _npy()
    server.files["arr.npy"] = blob
    s = _spec(
        "fake_npy",
        "https://mirror.invalid/x/arr.npy",
        "arr.npy",
        f"sha256:{_sha256(blob)}",
        layout=("arr.npy",),
    )
    gd.download(s, tmp_path / "a", progress=False, url_base=server.base + "/")
    assert (tmp_path / "a" / "fake_npy" / "arr.npy").read_bytes() == blob
    monkeypatch.setenv(downloader.URL_BASE_ENV, server.base)
    gd.download(s, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "fake_npy" / "arr.npy").read_bytes() == blob
    assert [r[0] for r in server.requests] == ["arr.npy", "arr.npy"]


# --------------------------------------------------------------------------------------------- failures
def test_corrupted_archive_names_file_and_both_checksums(server, tmp_path):
    good, bad = _targz(), _targz()[:-10] + b"0123456789"
    server.files["fake.tar.gz"] = bad
    s = _spec("fake_bad", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(good)}")
    with pytest.raises(gd.ChecksumError) as e:
        gd.download(s, tmp_path, progress=False)
    msg = str(e.value)
    assert "fake.tar.gz" in msg and _sha256(good) in msg and _sha256(bad) in msg
    d = tmp_path / "fake_bad"
    assert not (d / ".complete").exists() and not (d / "fake.tar.gz").exists()
    assert not (d / "fake.tar.gz.part").exists()
    assert (d / "fake.tar.gz.corrupt").read_bytes() == bad
    assert not (d / "fake").exists()  # nothing extracted
    with pytest.raises(FileNotFoundError, match="greg data download fake_bad"):
        gd.verify(s, tmp_path)


def test_truncated_download_errors_then_resumes_with_range(server, tmp_path):
    blob = _targz()
    server.files["fake.tar.gz"] = blob
    server.truncate.add("fake.tar.gz")
    s = _spec("fake_trunc", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(blob)}")
    with pytest.raises(gd.DownloadError, match="fake.tar.gz") as e:
        gd.download(s, tmp_path, progress=False)
    assert str(len(blob)) in str(e.value)
    d = tmp_path / "fake_trunc"
    assert not (d / ".complete").exists() and not (d / "fake.tar.gz").exists()
    part = d / "fake.tar.gz.part"
    assert part.read_bytes() == blob[: len(blob) // 2]

    server.truncate.clear()
    gd.download(s, tmp_path, progress=False)
    assert server.requests[-1] == ("fake.tar.gz", f"bytes={len(blob) // 2}-")
    assert (d / "fake.tar.gz").read_bytes() == blob and (d / ".complete").is_file()


def test_http_error_is_reported(server, tmp_path):
    s = _spec("fake_404", server.url("missing.tar.gz"), "missing.tar.gz", "md5:" + "0" * 32)
    with pytest.raises(gd.DownloadError, match="HTTP 404"):
        gd.download(s, tmp_path, progress=False)
    assert not (tmp_path / "fake_404" / ".complete").exists()


def test_unknown_checksum_is_recorded_in_lock_then_enforced(server, tmp_path, capsys):
    blob = _npy()
    server.files["arr.npy"] = blob
    s = _spec("fake_lock", server.url("arr.npy"), "arr.npy", None, layout=("arr.npy",))
    gd.download(s, tmp_path, progress=False)
    assert "recorded sha256" in capsys.readouterr().out
    lock = json.loads((tmp_path / "checksums.lock.json").read_text())
    assert lock["files"]["fake_lock/arr.npy"]["sha256"] == _sha256(blob)
    assert lock["files"]["fake_lock/arr.npy"]["size"] == len(blob)
    gd.verify(s, tmp_path)

    # the server now hands out different bytes: a fresh download must fail against the lock entry
    d = tmp_path / "fake_lock"
    (d / ".complete").unlink()
    (d / "arr.npy").unlink()
    changed = blob[:-1] + b"\x01"
    server.files["arr.npy"] = changed
    with pytest.raises(gd.ChecksumError) as e:
        gd.download(s, tmp_path, progress=False)
    assert "checksums.lock.json" in str(e.value) and _sha256(changed) in str(e.value)
    assert not (d / ".complete").exists() and (d / "arr.npy.corrupt").exists()
    assert json.loads((tmp_path / "checksums.lock.json").read_text()) == lock  # the lock is not rewritten


def test_tampered_file_fails_verify(server, tmp_path):
    blob = _npy()
    server.files["arr.npy"] = blob
    s = _spec("fake_verify", server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",))
    gd.download(s, tmp_path, progress=False)
    (tmp_path / "fake_verify" / "arr.npy").write_bytes(blob[:-1] + b"\x07")
    with pytest.raises(gd.ChecksumError, match="fake_verify/arr.npy|arr.npy"):
        gd.verify(s, tmp_path)


def test_tar_member_escaping_the_directory_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(RuntimeError, match="cannot extract"):
        downloader.extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


# ------------------------------------------------------------------------- loaders of registered sets
def _mark(root: Path, name: str) -> Path:
    d = root / gd.spec(name).directory
    d.mkdir(parents=True, exist_ok=True)
    (d / ".complete").write_text("{}")
    return d


def test_not_downloaded_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="greg data download svhn"):
        gd.load("svhn", "test", tmp_path)


def _trust(monkeypatch, name: str, path: Path) -> None:
    """Register ``name`` with the md5 of ``path`` (a stand-in file in its data directory) as the published
    digest of that file."""
    s = gd.spec(name)
    fake = dataclasses.replace(
        s, file_checksums={path.name: f"md5:{hashlib.md5(path.read_bytes()).hexdigest()}"}
    )
    monkeypatch.setitem(DATASETS._items, name, lambda: fake)


def test_svhn_and_random300k_loaders(tmp_path, monkeypatch):
    from scipy.io import savemat

    x = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3, 7), dtype=np.uint8)
    mat = _mark(tmp_path, "svhn") / "test_32x32.mat"
    savemat(mat, {"X": x, "y": np.ones((7, 1))})
    _trust(monkeypatch, "svhn", mat)
    ds = gd.load("svhn", "test", tmp_path, id_dataset="cifar10")
    assert len(ds) == 7 and ds[2][1] == -1
    s = gd.spec("cifar10")
    expected = (x[..., 2].transpose(2, 0, 1) / 255.0 - np.array(s.mean)[:, None, None]) / np.array(s.std)[
        :, None, None
    ]
    np.testing.assert_allclose(ds[2][0].numpy(), expected, atol=2e-6)

    arr = np.random.default_rng(1).integers(0, 256, size=(9, 32, 32, 3), dtype=np.uint8)
    np.save(_mark(tmp_path, "random300k") / "300K_random_images.npy", arr)
    aux = gd.load("random300k", "train", tmp_path, train=True)
    assert len(aux) == 9 and aux[8][0].shape == (3, 32, 32) and aux[8][1] == -1
    assert isinstance(aux.raw.images, catalog.LazyNpy)
    clone = pickle.loads(pickle.dumps(aux))
    assert clone.raw.images._arr is None and np.array_equal(clone.raw.images[3], arr[3])

    np.save(tmp_path / "random300k" / "300K_random_images.npy", arr[:, :16])
    with pytest.raises(ValueError, match="N x 32 x 32 x 3"):
        gd.load("random300k", "train", tmp_path)


def _imagenet_tree(root: Path, wnids, splits=("train", "val")):
    jpeg = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), 90, dtype=np.uint8)).save(jpeg, format="JPEG")
    for split in splits:
        for w in wnids:
            d = root / "imagenet" / split / w
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{w}_1.JPEG").write_bytes(jpeg.getvalue())


def test_imagenet_is_never_downloaded_and_placement_is_checked(tmp_path):
    with pytest.raises(gd.ManualDownloadRequired) as e:
        gd.download("imagenet10", tmp_path)
    msg = str(e.value)
    assert "image-net.org" in msg and str(tmp_path / "imagenet" / "train") in msg and "n02396427" in msg
    with pytest.raises(gd.ManualDownloadRequired):
        gd.load("imagenet10", "test", tmp_path)

    _imagenet_tree(tmp_path, catalog.IMAGENET10_WNIDS)
    assert any("10/10 classes" in line for line in gd.verify("imagenet10", tmp_path))
    ds = gd.load("imagenet10", "test", tmp_path)
    assert len(ds) == 10 and sorted(ds[i][1] for i in range(10)) == list(range(10))
    assert ds[0][0].shape == (3, 224, 224)

    with pytest.raises(gd.ManualDownloadRequired, match="expected 990"):
        gd.verify("imagenet990", tmp_path)
    _imagenet_tree(tmp_path, [f"n{90000000 + i:08d}" for i in range(990)], splits=("train",))
    gd.download("imagenet990", tmp_path)  # only checks
    aux = gd.load("imagenet990", "train", tmp_path)
    assert len(aux) == 990 and aux[0][1] == -1


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_download_verify_list(server, tmp_path, monkeypatch, capsys):
    blob = _npy()
    server.files["arr.npy"] = blob
    s = _spec(
        "_test_cli",
        "https://mirror.invalid/arr.npy",
        "arr.npy",
        f"sha256:{_sha256(blob)}",
        layout=("arr.npy",),
    )
    monkeypatch.setitem(DATASETS._items, "_test_cli", lambda: s)
    args = ["--root", str(tmp_path)]
    assert (
        greg_main(["data", "download", "_test_cli", *args, "--url-base", server.base, "--no-progress"]) == 0
    )
    assert greg_main(["data", "download", "_test_cli", *args]) == 0  # no-op, no URL needed
    assert "already downloaded" in capsys.readouterr().out
    assert greg_main(["data", "verify", "_test_cli", *args]) == 0
    assert "_test_cli: OK" in capsys.readouterr().out
    (tmp_path / "_test_cli" / "arr.npy").write_bytes(b"x")
    assert greg_main(["data", "verify", "_test_cli", *args]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and _sha256(blob) in err and _sha256(b"x") in err
    assert greg_main(["data", "download", "imagenet10", *args]) == 1
    assert "image-net.org" in capsys.readouterr().err
    assert greg_main(["data", "download", "no_such_set", *args]) == 1
    assert "unknown dataset" in capsys.readouterr().err
    assert greg_main(["data", "list", "--role", "ood"]) == 0
    out = capsys.readouterr().out
    assert "svhn" in out and "cifar10 " not in out


# ----------------------------------------------------------------- mirror, offline hint, released checkpoints
def test_offline_download_is_one_line_that_says_what_to_do(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(downloader.MIRROR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    dead = server.base
    server.close()  # nothing listens there any more: as on a node without network
    name = "densenet100_cifar10_released"
    assert greg_main(["data", "download", name, "--url-base", dead, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    sha = "deaefd082911a1c6c92aacdcfecf03c71b932acc5c08b779c85c44eccdc0c817"
    dest = Path("data") / name / "densenet100_cifar10.pth"  # --root defaults to data, like the other commands
    assert "\n" not in err and err.startswith("greg data: downloading densenet100_cifar10.pth")
    assert f"place the file by hand at {dest} (sha256 {sha})" in err
    assert "--mirror DIR ($GREG_MIRROR)" in err and "--url-base URL" in err
    assert not (tmp_path / "data" / name / ".complete").exists()


def test_mirror_copies_verifies_and_never_touches_the_network(server, tmp_path, monkeypatch):
    blob = _npy()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "arr.npy").write_bytes(blob)
    s = _spec("fake_mirror", server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",))
    gd.download(s, tmp_path / "a", progress=False, mirror=mirror)
    assert (tmp_path / "a" / "fake_mirror" / "arr.npy").read_bytes() == blob
    monkeypatch.setenv(downloader.MIRROR_ENV, str(mirror))
    gd.download(s, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "fake_mirror" / "arr.npy").read_bytes() == blob
    assert server.requests == []

    # a mirror file with other bytes fails like a download; the mirror's own file is left as it was
    (mirror / "arr.npy").write_bytes(blob[:-1] + b"\x09")
    with pytest.raises(gd.ChecksumError, match=_sha256(blob)):
        gd.download(s, tmp_path / "c", progress=False)
    assert (mirror / "arr.npy").exists() and (tmp_path / "c" / "fake_mirror" / "arr.npy.corrupt").exists()
    # a file the mirror does not hold comes from the URL
    monkeypatch.setenv(downloader.MIRROR_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="mirror directory"):
        gd.download(s, tmp_path / "d", progress=False)
    (tmp_path / "empty").mkdir()
    server.files["arr.npy"] = blob
    gd.download(s, tmp_path / "d", progress=False)
    assert server.requests == [("arr.npy", None)]


def test_released_checkpoints_have_their_published_urls_and_sha256():
    for ds, file, blob, sha in (
        ("cifar10", "densenet100_cifar10.pth", "cifar10DensenetPretrained.pth",
         "deaefd082911a1c6c92aacdcfecf03c71b932acc5c08b779c85c44eccdc0c817"),
        ("cifar100", "densenet100_cifar100.pth", "baseline_100.pth",
         "7f18c6f76cf1696ffca0178f1086173d561de0ddadbfad8e00f3f83d4ab2baf9"),
    ):  # fmt: skip
        s = gd.spec(f"densenet100_{ds}_released")
        (r,) = s.resources
        assert (
            r.url
            == f"https://github.com/o4lc/Greg-OOD/raw/2b0d8c021c072ef8b7d5ff6b1e5bc81c8700bbd7/models/{blob}"
        )
        assert (r.filename, r.checksum, s.role, s.benchmark) == (file, f"sha256:{sha}", "weights", ds)
        assert gd.weights_path(s.name, "data") == Path("data") / s.name / file


def test_released_checkpoint_from_the_local_mirror(checkpoint_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(downloader.MIRROR_ENV, raising=False)
    monkeypatch.delenv(downloader.URL_BASE_ENV, raising=False)
    name = "densenet100_cifar100_released"
    args = ["data", "download", name, "--root", str(tmp_path), "--no-progress"]
    assert greg_main([*args, "--mirror", str(checkpoint_mirror)]) == 0
    path = gd.weights_path(name, tmp_path)
    assert path.read_bytes() == (checkpoint_mirror / "densenet100_cifar100.pth").read_bytes()
    assert greg_main(["data", "verify", name, "--root", str(tmp_path)]) == 0
    assert f"{name}: OK" in capsys.readouterr().out
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "state_dict" in state  # the file the import rule hands to `greg train` as init.checkpoint


def test_downloader_does_not_import_the_catalog():
    # the catalog builds on the downloader (require, checksums); the reverse edge made an import cycle
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(downloader))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "greg.data.catalog" not in imported and "greg.data" not in imported
    assert "greg.data.base" in imported


# ------------------------------------------------------------- stand-in files: --url-base + --checksums
def test_stand_in_files_via_url_base_and_checksums_file(server, tmp_path, monkeypatch, capsys):
    """The path a rehearsal takes: the real catalog entry, files served from a local URL base, verified
    against a checksum file instead of the published digests; loads and verifies afterwards."""
    from scipy.io import savemat

    monkeypatch.delenv(downloader.CHECKSUMS_ENV, raising=False)
    monkeypatch.delenv(downloader.MIRROR_ENV, raising=False)
    x = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    buf = io.BytesIO()
    savemat(buf, {"X": x, "y": np.ones((5, 1))})
    blob = buf.getvalue()
    server.files["test_32x32.mat"] = blob
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"# stand-ins\n{_sha256(blob)}  test_32x32.mat\n")
    root = ["--root", str(tmp_path / "data"), "--url-base", server.base, "--no-progress"]
    assert greg_main(["data", "download", "svhn", *root]) == 1  # the published md5 does not match
    err = capsys.readouterr().err
    assert "eb5a983be6a315427106f1b164d9cef3" in err and "--accept-checksum test_32x32.mat=md5:" in err

    (tmp_path / "data" / "svhn" / "test_32x32.mat.corrupt").unlink()
    assert greg_main(["data", "download", "svhn", *root, "--checksums", str(sums)]) == 0
    err = capsys.readouterr().err
    assert "warning: svhn: test_32x32.mat accepted with sha256:" in err and str(sums) in err
    marker = json.loads((tmp_path / "data" / "svhn" / ".complete").read_text())
    assert marker["overrides"]["test_32x32.mat"] == {
        "checksum": f"sha256:{_sha256(blob)}", "origin": f"checksum file {sums}", "kind": "checksums",
        "published": "md5:eb5a983be6a315427106f1b164d9cef3",
    }  # fmt: skip
    ds = gd.load("svhn", "test", tmp_path / "data", id_dataset="cifar10")  # the load-time check honours it
    assert len(ds) == 5
    assert greg_main(["data", "verify", "svhn", "--root", str(tmp_path / "data")]) == 0
    assert "WARNING: test_32x32.mat was accepted with sha256:" in capsys.readouterr().out
    # the environment variable is the same option
    monkeypatch.setenv(downloader.CHECKSUMS_ENV, str(sums))
    assert greg_main(["data", "download", "svhn", *root[:2], "--url-base", server.base, "--force"]) == 0


def test_checksums_file_format_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "sums"
    bad.write_text("abc  x.tar\n")
    assert greg_main(["data", "download", "svhn", "--root", str(tmp_path), "--checksums", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"checksum file {bad} line 1: 'abc' is not a digest" in err
    assert downloader.read_checksums_file(_w(tmp_path / "ok", f"{'a' * 32} *x.tar\n\n{'B' * 64}  d/y\n")) == {
        "x.tar": "md5:" + "a" * 32, "d/y": "sha256:" + "b" * 64,
    }  # fmt: skip


def _w(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- a wrong published checksum
def test_wrong_published_checksum_needs_an_explicit_loud_accept(server, tmp_path, capsys):
    blob = _targz()
    server.files["fake.tar.gz"] = blob
    wrong = "md5:" + "0" * 32
    s = _spec("_test_accept", server.url("fake.tar.gz"), "fake.tar.gz", wrong)
    with pytest.raises(gd.ChecksumError) as e:
        gd.download(s, tmp_path, progress=False)
    md5 = hashlib.md5(blob).hexdigest()
    assert f"rerun with --accept-checksum fake.tar.gz=md5:{md5}" in str(e.value)
    (tmp_path / s.name / "fake.tar.gz.corrupt").unlink()
    with pytest.raises(gd.ChecksumError, match="neither md5:1{32}"):  # another digest than the file's
        gd.download(s, tmp_path, progress=False, accept={"fake.tar.gz": "1" * 32})
    (tmp_path / s.name / "fake.tar.gz.corrupt").unlink()
    capsys.readouterr()
    gd.download(s, tmp_path, progress=False, accept={"_test_accept": md5})  # the dataset's name: its one file
    err = capsys.readouterr().err
    assert (
        f"warning: _test_accept: fake.tar.gz accepted with md5:{md5} from --accept-checksum, NOT the published"
        in err
    )
    marker = json.loads((tmp_path / s.name / ".complete").read_text())
    assert marker["overrides"] == {
        "fake.tar.gz": {
            "checksum": f"md5:{md5}",
            "origin": "--accept-checksum",
            "kind": "accept",
            "published": wrong,
        }
    }
    lines = gd.verify(s, tmp_path)
    assert lines[0].startswith("WARNING: fake.tar.gz was accepted with md5:") and lines[-1].startswith(
        "layout OK"
    )


def test_accept_checksum_flag_errors_are_one_line_exit_2(tmp_path, capsys):
    base = ["data", "download", "svhn", "--root", str(tmp_path)]
    for flag, words in (
        (["--accept-checksum", "nonsense"], "allowed: NAME=DIGEST"),
        (
            ["--accept-checksum", "other.tar=" + "a" * 32],
            "'other.tar' is no file of the named datasets; allowed: svhn",
        ),
        (["--accept-checksum", "svhn=md5:xyz"], "'md5:xyz' is not a digest"),
        (["--read-timeout", "0"], "--read-timeout 0: allowed: a finite number > 0"),
        (["--min-rate", "-1"], "--min-rate -1: allowed: a finite number >= 0"),
    ):
        assert greg_main([*base, *flag]) == 2, flag
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, (flag, err)
    assert not (tmp_path / "svhn").exists()


# ------------------------------------------------------------------------------------------ HTML pages
@pytest.mark.parametrize("header", [True, False])
def test_an_html_page_is_refused_as_such(server, tmp_path, header):
    page = b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head></html>"
    server.files["fake.tar.gz"] = page
    if header:
        server.content_type["fake.tar.gz"] = "text/html; charset=utf-8"
    s = _spec("_test_html", server.url("fake.tar.gz"), "fake.tar.gz", "md5:" + "0" * 32)
    with pytest.raises(gd.DownloadError) as e:
        gd.download(s, tmp_path, progress=False)
    msg = str(e.value)
    assert f"downloading fake.tar.gz from {server.url('fake.tar.gz')}: got an HTML page titled " in msg
    assert "'Google Drive - Quota exceeded', not the file" in msg and "\n" not in msg
    assert sorted(p.name for p in (tmp_path / s.name).iterdir()) == [
        ".download.lock"
    ]  # no .part, no .corrupt


# ----------------------------------------------------------------------------- slow and stalled servers
def test_a_trickling_server_is_abandoned_and_the_part_resumed(server, tmp_path):
    blob = _npy()
    server.files["arr.npy"] = blob
    server.trickle["arr.npy"] = (100, 0.05)  # 100 bytes, then 20 bytes/s
    s = _spec("_test_slow", server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",))
    t0 = time.monotonic()
    with pytest.raises(gd.DownloadError) as e:
        gd.download(s, tmp_path, progress=False, read_timeout=0.3, min_rate=1000)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert f"download of arr.npy from {server.url('arr.npy')} is too slow" in msg and "--min-rate" in msg
    part = tmp_path / s.name / "arr.npy.part"
    assert "is kept and the next run resumes it" in msg and str(part) in msg and "\n" not in msg
    got = part.read_bytes()
    assert len(got) >= 100 and blob.startswith(got)
    server.trickle.clear()
    gd.download(s, tmp_path, progress=False)
    assert server.requests[-1] == ("arr.npy", f"bytes={len(got)}-")
    assert (tmp_path / s.name / "arr.npy").read_bytes() == blob


def test_a_stalled_server_hits_the_read_timeout(server, tmp_path):
    blob = _npy()
    server.files["arr.npy"] = blob
    server.trickle["arr.npy"] = (10, 3.0)  # 10 bytes, then silence
    s = _spec("_test_stall", server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",))
    t0 = time.monotonic()
    with pytest.raises(gd.DownloadError, match=r"stalled: no data for 0\.3 s \(--read-timeout\) after 10 of"):
        gd.download(s, tmp_path, progress=False, read_timeout=0.3, min_rate=0)
    assert time.monotonic() - t0 < 2.5
    assert (tmp_path / s.name / "arr.npy.part").read_bytes() == blob[:10]


def test_cli_timeout_flags_reach_the_transfer(server, tmp_path, monkeypatch, capsys):
    blob = _npy()
    server.files["arr.npy"] = blob
    server.trickle["arr.npy"] = (10, 3.0)
    s = _spec(
        "_test_cli_stall", server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",)
    )
    monkeypatch.setitem(DATASETS._items, s.name, lambda: s)
    args = ["data", "download", s.name, "--root", str(tmp_path), "--no-progress", "--read-timeout", "0.2"]
    assert greg_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stalled: no data for 0.2 s" in err and server.url("arr.npy") in err


# ------------------------------------------------------------------- two sets sharing one directory
def test_a_directory_being_downloaded_is_locked_and_the_second_waits(server, tmp_path, capsys):
    blob = _npy()
    server.files["arr.npy"] = blob
    mk = lambda name: dataclasses.replace(
        _spec(name, server.url("arr.npy"), "arr.npy", f"sha256:{_sha256(blob)}", layout=("arr.npy",)),
        data_dir="shared",
    )
    first, second = mk("_test_first"), mk("_test_second")
    d = tmp_path / "shared"
    d.mkdir()
    result = {}
    with downloader.download_lock(d, first.name):  # the first download holds the directory
        t = threading.Thread(
            target=lambda: result.setdefault("d", gd.download(second, tmp_path, progress=False))
        )
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and server.requests == []  # waiting, not downloading
        # the first one finishes: its file and marker appear, then it lets go of the lock
        (d / "arr.npy").write_bytes(blob)
        downloader.atomic_write_json(d / ".complete", {"dataset": first.name, "files": {"arr.npy": "x"}})
    t.join(10)
    assert not t.is_alive() and result["d"] == d and server.requests == []
    out = capsys.readouterr().out
    assert f"{d} is being downloaded by pid " in out and "(_test_first); waiting for it" in out
    assert "_test_second: already downloaded and verified" in out


# ----------------------------------------------------------------------------------- symbolic links
def _user_file(tmp_path: Path) -> Path:
    f = tmp_path / "user" / "notes.txt"
    f.parent.mkdir(exist_ok=True)
    f.write_text("precious")
    return f


@pytest.mark.parametrize("which", ["fake.tar.gz.part", ".complete", ".download.lock"])
def test_symlinks_in_the_dataset_directory_are_never_written_through(server, tmp_path, which):
    blob = _targz()
    server.files["fake.tar.gz"] = blob
    s = _spec("_test_link", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(blob)}")
    user = _user_file(tmp_path)
    d = tmp_path / "root" / s.name
    d.mkdir(parents=True)
    (d / which).symlink_to(user)
    with pytest.raises(downloader.UnsafePathError) as e:
        gd.download(s, tmp_path / "root", progress=False, force=True)
    assert str(e.value).startswith(f"refusing to write through the symbolic link {d / which} (-> {user})")
    assert user.read_text() == "precious" and (d / which).is_symlink()


def test_extraction_never_writes_through_a_symlink(server, tmp_path):
    blob = _targz()
    server.files["fake.tar.gz"] = blob
    s = _spec("_test_xlink", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(blob)}")
    user = _user_file(tmp_path)
    d = tmp_path / "root" / s.name
    (d / "fake/images/a").mkdir(parents=True)
    (d / "fake/images/a/1.png").symlink_to(user)  # a member's target
    with pytest.raises(
        downloader.UnsafePathError, match="member 'fake/images/a/1.png' would be written through"
    ):
        gd.download(s, tmp_path / "root", progress=False)
    (d / "fake/images/a/1.png").unlink()
    (d / "fake/images/b").symlink_to(user.parent, target_is_directory=True)  # a member's folder
    with pytest.raises(
        downloader.UnsafePathError, match=r"fake/images/b/0.png' would be written through .*/b \(->"
    ):
        gd.download(s, tmp_path / "root", progress=False)
    assert sorted(p.name for p in user.parent.iterdir()) == ["notes.txt"] and user.read_text() == "precious"
    assert not (d / ".complete").exists()
    zpath = tmp_path / "z.zip"
    zpath.write_bytes(_zip())
    with pytest.raises(downloader.UnsafePathError):
        downloader.extract(zpath, d)
    assert sorted(p.name for p in user.parent.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------ image count after extraction
def _targz_with(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_image_count_is_checked_and_dot_files_are_skipped(server, tmp_path):
    blob = _targz_with({**IMAGES, "fake/images/a/._0.png": b"\x00\x05\x16\x07 AppleDouble"})
    server.files["fake.tar.gz"] = blob
    s = dataclasses.replace(
        _spec("_test_count", server.url("fake.tar.gz"), "fake.tar.gz", f"sha256:{_sha256(blob)}"),
        archive_images=6,
    )
    d = gd.download(s, tmp_path, progress=False)
    assert json.loads((d / ".complete").read_text())["images"] == 6
    raw = s.loader(s, "test", tmp_path)
    assert len(raw.files) == 6 and not any(p.name.startswith(".") for p in raw.files)
    more = dataclasses.replace(s, name="_test_count7", archive_images=7)
    with pytest.raises(gd.CorruptDataError) as e:
        gd.download(more, tmp_path, progress=False)
    assert str(e.value).startswith(
        f"_test_count7: 6 images under {tmp_path / '_test_count7' / 'fake/images'} after extraction, the catalog "
        "expects 7 (dot-files such as ._x.jpg are not counted)"
    )
    assert not (tmp_path / "_test_count7" / ".complete").exists()


# ------------------------------------------------------------------------- markers of another catalog
def test_a_marker_for_other_files_is_not_taken_as_complete(server, tmp_path, capsys):
    d = tmp_path / "places365"
    (d / "val_256").mkdir(parents=True)
    (d / ".complete").write_text(json.dumps({"dataset": "places365", "files": {"val_256.tar": "md5:e27b"}}))
    with pytest.raises(FileNotFoundError) as e:
        gd.load("places365", "test", tmp_path)
    expects = "records val_256.tar, the catalog now expects places365_test_list.txt, test_256.tar"
    assert expects in str(e.value)
    with pytest.raises(FileNotFoundError, match="records val_256.tar"):
        gd.verify("places365", tmp_path)
    with pytest.raises(gd.DownloadError):  # downloads again (here: nothing listens)
        gd.download("places365", tmp_path, progress=False, url_base=server.base)
    assert f"{expects}; downloading again" in capsys.readouterr().out


def test_marker_with_malformed_entries_is_one_line(tmp_path):
    d = _mark(tmp_path, "places365")
    (d / ".complete").write_text(json.dumps({"files": {"test_256.tar": "md5:x"}, "extracted": ["a.jpg"]}))
    with pytest.raises(
        gd.CorruptDataError, match=r"\.complete: 'extracted' must be a mapping of file -> str, got list"
    ):
        gd.verify("places365", tmp_path)


# --------------------------------------------------------------------- the catalog against torchvision
def _class_attrs(module: str) -> dict[str, dict]:
    """Class-level literal assignments of ``torchvision/datasets/<module>.py``, read from its source (no
    slow torchvision import): ``{class: {name: value}}``, plus ``""`` for the module level."""
    import ast
    import importlib.util

    src = Path(importlib.util.find_spec("torchvision").origin).parent / "datasets" / f"{module}.py"
    tree = ast.parse(src.read_text())
    out: dict[str, dict] = {}

    def literals(body) -> dict:
        found = {}
        for n in body:
            targets = (
                n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            )
            for tg in targets:
                if isinstance(tg, ast.Name) and n.value is not None:
                    try:
                        found[tg.id] = ast.literal_eval(n.value)
                    except ValueError:
                        pass
        return found

    out[""] = literals(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = literals(node.body)
    return out


def test_every_url_and_md5_torchvision_also_ships_is_torchvision_s():
    def res(name):
        (r,) = gd.spec(name).resources
        return r.url, r.filename, r.checksum

    cifar = _class_attrs("cifar")
    for cls, name in (("CIFAR10", "cifar10"), ("CIFAR100", "cifar100")):
        a = cifar[cls]
        assert res(name) == (a["url"], a["filename"], f"md5:{a['tgz_md5']}")
    svhn_url, svhn_file, svhn_md5 = _class_attrs("svhn")["SVHN"]["split_list"]["test"]
    assert res("svhn") == (svhn_url, svhn_file, f"md5:{svhn_md5}")
    assert gd.spec("svhn").file_checksums == {svhn_file: f"md5:{svhn_md5}"}
    dtd = _class_attrs("dtd")["DTD"]
    for name in ("textures", "textures_imagenet"):
        assert res(name) == (dtd["_URL"], dtd["_URL"].rsplit("/", 1)[1], f"md5:{dtd['_MD5']}")
    places = _class_attrs("places365")["Places365"]
    file, md5 = places["_IMAGES_META"][("test", True)]
    tar = gd.spec("places365").resources[0]
    assert (tar.url, tar.filename, tar.checksum) == (places["_BASE_URL"] + file, file, f"md5:{md5}")
    meta = _class_attrs("imagenet")[""]["ARCHIVE_META"]
    for key in ("train", "val", "devkit"):
        file, md5 = meta[key]
        assert f"{file}, md5 {md5}" in catalog.IMAGENET_INSTRUCTIONS.replace("\n", " "), key


def test_places365_is_the_published_10k_of_test_256(tmp_path):
    s = gd.spec("places365")
    assert (s.sizes, s.archive_images, s.file_size, s.layout) == (
        {"test": 10000}, 328500, (256, 256), ("test_256", "places365_test_list.txt"),
    )  # fmt: skip
    tar, lst = s.resources
    assert lst.url == (
        "https://raw.githubusercontent.com/jfc43/informative-outlier-mining/258efede70c778bf6e9e528869b2cab58b071e3e"
        "/datasets/ood_datasets/places365/test_subset/places365_test_list.txt"
    )
    assert lst.checksum == "sha256:e992c94b23b7416e8f71c0cab87b777b0e7022ee1b4aeed19d5b16ddf1b90578"
    assert not lst.is_archive and tar.is_archive
    # the loader: the images the list names, in its order; a named image that is missing is one line
    d = _mark(tmp_path, "places365")
    (d / "test_256").mkdir()
    png = io.BytesIO()
    Image.fromarray(np.zeros((256, 256, 3), dtype=np.uint8)).save(png, format="PNG")
    for i in range(1, 10):
        (d / "test_256" / f"Places365_test_{i:08d}.jpg").write_bytes(png.getvalue())
    (d / "places365_test_list.txt").write_text("Places365_test_00000002.jpg\nPlaces365_test_00000007.jpg\n")
    ds = gd.load("places365", "test", tmp_path)
    assert [p.name for p in ds.raw.files] == ["Places365_test_00000002.jpg", "Places365_test_00000007.jpg"]
    assert ds[1][0].shape == (3, 32, 32)
    (d / "test_256" / "Places365_test_00000007.jpg").unlink()
    with pytest.raises(
        gd.CorruptDataError, match=r"1 of the 2 images named in .* are missing \(e.g. Places365_test_00000007"
    ):
        gd.load("places365", "test", tmp_path)


def test_download_rule_param_names_every_catalog_file_and_checksum(monkeypatch):
    """The download rule's param (workflow/rules/data.smk) is the dataset's catalog files with their checksums,
    so a catalog change reruns the download (rerun-triggers: params) instead of leaving a stale ready-stamp."""
    from types import SimpleNamespace

    from greg import plan as P

    assert P.catalog_files("places365") == (
        "test_256.tar=md5:f532f6ad7b582262a2ec8009075e186b;"
        "places365_test_list.txt=sha256:e992c94b23b7416e8f71c0cab87b777b0e7022ee1b4aeed19d5b16ddf1b90578"
    )
    assert P.catalog_files("tiny") == ""  # generated on the fly: nothing to download
    old = P.data.spec("svhn")
    new = SimpleNamespace(resources=[dataclasses.replace(r, checksum="md5:" + "0" * 32) for r in old.resources])
    monkeypatch.setattr(P.data, "spec", lambda name: new)
    assert P.catalog_files("svhn") == "test_32x32.mat=md5:" + "0" * 32
