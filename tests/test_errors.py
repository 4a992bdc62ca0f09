"""greg.errors (one-line CLI errors, exit codes), greg.io naming the file of a failed write, and the data
checks behind them: truncated ``.npy`` files, CIFAR batch md5s, extracted files re-checked by verify."""

from __future__ import annotations

import ast
import dataclasses
import errno
import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

import greg.data as gd
from greg import io as gio
from greg.cli import main as greg_main
from greg.data import catalog, downloader
from greg.data.base import DATASETS, DatasetSpec, RawImages, Resource
from greg.errors import EXIT_INPUT, EXIT_IO, InputError, cap, cli_errors, did_you_mean, error_text, exit_code
from greg.models import CheckpointError


# ------------------------------------------------------------------------------------------ greg.errors
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/x.npy"), EXIT_INPUT),
        (OSError(errno.ENOSPC, "No space left on device", "/d/m.csv"), EXIT_IO),
        (OSError(errno.EROFS, "Read-only file system", "/d/m.csv"), EXIT_IO),
        (PermissionError(errno.EACCES, "Permission denied", "/d"), EXIT_IO),
        (CheckpointError("/d/final.pt: 3 missing keys"), EXIT_INPUT),
        (InputError("--ood needs a name"), EXIT_INPUT),
        (ValueError("mmap length is greater than file size"), EXIT_INPUT),
        (KeyError("unknown dataset 'x'"), EXIT_INPUT),
        (downloader.ChecksumError("checksum mismatch"), EXIT_INPUT),
        (downloader.DownloadError("cut off"), EXIT_IO),
        (MemoryError(), EXIT_IO),
    ],
)
def test_exit_codes(exc, code):
    assert exit_code(exc) == code


def test_error_text_names_the_file_and_foreign_types():
    # an OSError without the file in its message gets it appended
    e = OSError(errno.ENOSPC, "No space left on device")
    e.filename = "/d/m.csv"
    assert error_text(e) == "[Errno 28] No space left on device: '/d/m.csv'"
    assert error_text(KeyError("unknown dataset 'x'")) == "unknown dataset 'x'"  # no extra quotes
    assert error_text(KeyError("lr")) == "KeyError: 'lr'"
    assert error_text(CheckpointError("bad file")) == "bad file"  # greg's own: the message is enough
    assert error_text(ValueError("mmap length")) == "ValueError: mmap length"  # numpy/torch: keep the type
    assert error_text(RuntimeError()) == "RuntimeError"


def test_cli_errors_decorator_and_context_manager(capsys, monkeypatch):
    monkeypatch.delenv("GREG_TRACEBACK", raising=False)

    @cli_errors("greg x")
    def run(exc):
        if exc is not None:
            raise exc
        return 0

    assert run(None) == 0
    assert run(FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/a")) == 2
    assert run(OSError(errno.ENOSPC, "No space left on device", "/d/b")) == 1
    assert run(CheckpointError("/d/c.pt: 2 missing keys")) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "greg x: [Errno 2] No such file or directory: '/d/a'",
        "greg x: [Errno 28] No space left on device: '/d/b'",
        "greg x: /d/c.pt: 2 missing keys",
    ]
    with pytest.raises(TypeError):  # a bug keeps its traceback
        run(TypeError("bug"))
    with pytest.raises(SystemExit):
        run(SystemExit(3))
    with cli_errors("greg y") as ce:
        raise InputError("--n must be positive")
    assert (ce.code, str(ce.error)) == (2, "--n must be positive")
    with cli_errors("greg y") as ce:
        pass
    assert ce.code == 0 and ce.error is None
    monkeypatch.setenv("GREG_TRACEBACK", "1")
    assert run(ValueError("boom")) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("greg x: ValueError: boom\n")


# ---------------------------------------------------------------------------------------------- greg.io
def test_one_did_you_mean_for_registries_config_keys_hparams_and_kwargs():
    from greg import config, methods

    assert did_you_mean("lamda_grad", ["lambda_grad", "lambda_S"]) == " (did you mean 'lambda_grad'?)"
    assert did_you_mean("zzz", ["lambda_grad"]) == ""
    # every "unknown ..." message carries the same suggestion text
    with pytest.raises(KeyError, match=r"unknown method 'gregg' \(did you mean 'greg'\?\); known: "):
        methods.METHODS.get("gregg")
    with pytest.raises(config.ConfigError, match=r"unknown config key 'optim\.lrr' \(did you mean 'lr'\?\)"):
        config.check({"optim": {"lrr": 1}}, partial=True)
    with pytest.raises(ValueError, match=r"unknown hparam\(s\) 'lamda_grad' \(did you mean 'lambda_grad'\?\)"):
        methods.create("greg", lamda_grad=1.0)


def test_long_messages_are_capped(capsys):
    assert cap("x" * 10, 20) == "x" * 10
    assert cap("x" * 30, 20) == "x" * 20 + "... (30 characters in all)"

    @cli_errors("greg x")
    def fail() -> int:
        raise InputError("v" * 10**6)

    assert fail() == EXIT_INPUT
    err = capsys.readouterr().err
    assert len(err) < 2100 and err.endswith("... (1,000,000 characters in all)\n"), err[-80:]


def test_atomic_write_failure_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def fsync(fd):  # what a full disk does at flush/fsync: an OSError without a file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        gio.atomic_write_text(target, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert str(target) in str(e.value) and "No space left on device" in str(e.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    monkeypatch.undo()

    # an error about another file (read inside the block) is left as it is
    with pytest.raises(FileNotFoundError) as e, gio.atomic_open(target) as f:
        f.write((tmp_path / "source.txt").read_text())
    assert e.value.filename == str(tmp_path / "source.txt")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------ data files
def _mark(root: Path, name: str, marker: str = "{}") -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / ".complete").write_text(marker)
    return d


def test_truncated_npy_names_file_shape_and_sizes(tmp_path):
    f = _mark(tmp_path, "random300k") / "300K_random_images.npy"
    np.save(f, np.zeros((40, 32, 32, 3), np.uint8))
    assert f.stat().st_size == 128 + 40 * 32 * 32 * 3  # npy v1 header: 128 bytes
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(gd.CorruptDataError) as e:
        gd.load("random300k", "train", tmp_path)
    msg = str(e.value)
    for word in (str(f), "(40, 32, 32, 3)", "123008 bytes", "the file has 1000 bytes", "greg data verify"):
        assert word in msg, (word, msg)
    f.write_bytes(b"not numpy at all")
    with pytest.raises(gd.CorruptDataError, match="not a readable .npy file"):
        catalog.open_npy(f)


def test_cifar_md5s_are_torchvision_s():
    """Our copy of the batch md5s equals torchvision's lists (read from its source: no slow import)."""
    src = Path(importlib.util.find_spec("torchvision").origin).parent / "datasets" / "cifar.py"
    lists: dict[str, dict] = {}
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.ClassDef):
            attrs = {
                t.id: ast.literal_eval(n.value)
                for n in node.body
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name) and t.id in ("base_folder", "train_list", "test_list", "meta")
            }
            lists[node.name] = attrs
    for cls, name in (("CIFAR10", "cifar10"), ("CIFAR100", "cifar100")):
        a = lists[cls] if "train_list" in lists[cls] else {**lists["CIFAR10"], **lists[cls]}
        files = a["train_list"] + a["test_list"] + [[a["meta"]["filename"], a["meta"]["md5"]]]
        expected = {f"{a['base_folder']}/{f}": f"md5:{md5}" for f, md5 in files}
        assert gd.spec(name).file_checksums == expected


def _fake_cifar10(root: Path) -> dict[str, str]:
    """Tiny CIFAR-10 batches (2 images each); returns their real md5s in ``file_checksums`` form."""
    d = _mark(root, "cifar10") / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    sums = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, n in enumerate(names):
        blob = pickle.dumps({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [i, 9 - i]})
        (d / n).write_bytes(blob)
        sums[f"cifar-10-batches-py/{n}"] = f"md5:{hashlib.md5(blob).hexdigest()}"
    meta = pickle.dumps({"label_names": [str(i) for i in range(10)]})
    (d / "batches.meta").write_bytes(meta)
    sums["cifar-10-batches-py/batches.meta"] = f"md5:{hashlib.md5(meta).hexdigest()}"
    return sums


def test_cifar_loader_checks_each_batch_and_verify_rechecks_extracted_files(tmp_path, monkeypatch, capsys):
    sums = _fake_cifar10(tmp_path)
    ok = dataclasses.replace(gd.spec("cifar10"), file_checksums=sums)
    monkeypatch.setitem(DATASETS._items, "cifar10", lambda: ok)
    raw: RawImages = catalog._cifar(ok, "test", tmp_path)
    test_batch = pickle.loads((tmp_path / "cifar10/cifar-10-batches-py/test_batch").read_bytes())
    assert raw.images.shape == (2, 32, 32, 3) and list(raw.labels) == [5, 4]
    # NCHW rows of 3072 bytes -> HWC: pixel (0, 1) of image 1, channel 2 is byte 2*1024 + 0*32 + 1
    assert raw.images[1, 0, 1, 2] == test_batch["data"][1, 2 * 1024 + 1]
    assert len(catalog._cifar(ok, "train", tmp_path).labels) == 10
    assert greg_main(["data", "verify", "cifar10", "--root", str(tmp_path)]) == 0
    assert "7 extracted files match their published digests" in capsys.readouterr().out

    bad = tmp_path / "cifar10/cifar-10-batches-py/data_batch_3"
    bad.write_bytes(bad.read_bytes()[:-1] + b"\0")
    actual = hashlib.md5(bad.read_bytes()).hexdigest()
    with pytest.raises(gd.ChecksumError) as e:
        catalog._cifar(ok, "train", tmp_path)
    assert str(bad) in str(e.value) and sums[f"cifar-10-batches-py/{bad.name}"][4:] in str(e.value)
    assert f"got md5 {actual}" in str(e.value)
    catalog._cifar(ok, "test", tmp_path)  # only the split's files are read, so only they are checked
    assert greg_main(["data", "verify", "cifar10", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("greg data: checksum mismatch for cifar-10-batches-py/data_batch_3") and actual in err
    )


def test_verify_rechecks_files_extracted_from_a_deleted_archive(tmp_path, monkeypatch, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in (("set/a.bin", b"alpha"), ("set/sub/b.bin", b"beta")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    s = DatasetSpec(
        name="_test_extracted", role="ood", num_classes=0, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
        loader=lambda *a: None, splits=("test",), layout=("set",),
        resources=(Resource("https://mirror.invalid/s.tar.gz", "s.tar.gz",
                            f"sha256:{hashlib.sha256(blob).hexdigest()}"),),
    )  # fmt: skip
    monkeypatch.setitem(DATASETS._items, s.name, lambda: s)
    d = tmp_path / s.name
    d.mkdir()
    (d / "s.tar.gz").write_bytes(blob)  # placed by hand: verified and extracted without a network
    gd.download(s.name, tmp_path, progress=False)
    marker = downloader.read_marker(s, tmp_path)
    assert marker["extracted"] == {
        "set/a.bin": f"sha256:{hashlib.sha256(b'alpha').hexdigest()}",
        "set/sub/b.bin": f"sha256:{hashlib.sha256(b'beta').hexdigest()}",
    }
    (d / "s.tar.gz").unlink()
    assert any("2 extracted files match" in line for line in gd.verify(s.name, tmp_path))

    (d / "set/sub/b.bin").write_bytes(b"beta!")
    with pytest.raises(gd.ChecksumError) as e:
        gd.verify(s.name, tmp_path)
    msg = str(e.value)
    assert str(d / "set/sub/b.bin") in msg and hashlib.sha256(b"beta").hexdigest() in msg
    assert hashlib.sha256(b"beta!").hexdigest() in msg and "--force" in msg
    (d / "set/a.bin").unlink()
    with pytest.raises(FileNotFoundError, match="a.bin is missing"):
        gd.verify(s.name, tmp_path)

    # a marker from before digests were recorded: verify says so instead of claiming the files are fine
    (d / ".complete").write_text('{"dataset": "_test_extracted", "files": {}}')
    (d / "set/a.bin").write_bytes(b"alpha")
    assert any("no digests recorded" in line for line in gd.verify(s.name, tmp_path))


def test_a_cuda_out_of_memory_is_one_short_line_saying_what_to_do():
    import torch

    report = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 39.39 GiB " + "x" * 3000
    e = torch.OutOfMemoryError(report)
    out = io.StringIO()
    with cli_errors("greg train") as ce:
        raise e
    assert ce.code == EXIT_IO  # retried: the next node's GPU may be larger
    from greg.errors import report_error

    report_error("greg train", e, file=out)
    line = out.getvalue().strip()
    assert line.startswith("greg train: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert line.endswith("docs/WORKFLOW.md 'Rehearsal' lists each method's measured memory: use a larger GPU")
    assert "\n" not in line and len(line) < 1100
