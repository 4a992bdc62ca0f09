"""Output directories and locks: a symlinked lock or temp file is never written through, an empty ``--out`` is
refused, a non-empty directory greg did not make is refused (train, evaluate), and where ``flock`` is not
supported (Lustre ``noflock``: ENOSYS) an ``O_EXCL`` lock file takes over with one warning line."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import greg.models as gm
from greg import io as gio
from greg.cli import main as greg_main

RUN = {
    "seed": 1,
    "model": {"name": "small_cnn"},
    "data": {"id": "tiny", "batch_size": 16},
    "method": {"name": "ce"},
    "optim": {"lr": 0.05},
    "train": {"epochs": 1, "max_steps": 1, "checkpoint_every": 1, "grad_norm_every": 0, "progress": False},
}


def cli(argv: list, capsys) -> tuple[int, str]:
    rc = greg_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("greg ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_yaml(tmp_path: Path) -> Path:
    cfg = json.loads(json.dumps(RUN))
    cfg["data"]["root"] = str(tmp_path / "data")
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def train(tmp_path: Path, out, capsys) -> tuple[int, str]:
    return cli(["train", "--config", run_yaml(tmp_path), "--out", out, "--device", "cpu"], capsys)


def evaluate(tmp_path: Path, out, capsys) -> tuple[int, str]:
    ck = tmp_path / "ce.pt"
    if not ck.exists():
        gm.save_checkpoint(ck, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10, meta={"method": "ce"})
    return cli(["evaluate", "--checkpoint", ck, "--id", "tiny", "--ood", "tiny_uniform", "--detector", "energy",
                "--out", out, "--device", "cpu", "--root", tmp_path / "data", "--n-ood", "20"], capsys)


# ------------------------------------------------------------------------------------ symlinks never followed


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "thesis.tex"
    victim.write_text("my thesis\n")
    for name, run in (("train", train), ("evaluate", evaluate)):
        out = tmp_path / f"{name}-out"
        out.mkdir()
        (out / gio.LOCK_NAME).symlink_to(victim)
        rc, err = run(tmp_path, out, capsys)
        line = one_line(err)
        assert rc == 2 and "is a symbolic link" in line and str(out / gio.LOCK_NAME) in line, err
        assert victim.read_text() == "my thesis\n" and sorted(p.name for p in out.iterdir()) == [gio.LOCK_NAME]


def test_a_temp_file_turned_into_a_symlink_is_never_published(tmp_path):
    victim = tmp_path / "mine.txt"
    victim.write_text("mine\n")
    target = tmp_path / "out" / "metrics.csv"
    with pytest.raises(gio.NotARunDirError, match="symbolic link"), gio.atomic_path(target) as tmp:
        tmp.unlink()
        tmp.symlink_to(victim)
    assert victim.read_text() == "mine\n" and not target.exists() and not os.path.lexists(tmp)
    # atomic_open writes through its own descriptor: a writer that swaps the name cannot redirect it
    with gio.atomic_open(target) as f:
        f.write("a,b\n")
    assert target.read_text() == "a,b\n" and not target.is_symlink()


# ------------------------------------------------------------------------------- empty or foreign --out


@pytest.mark.parametrize("argv", [
    ["train", "--config", "run.yaml", "--out", ""],
    ["train", "--config", "run.yaml", "--out="],
    ["evaluate", "--checkpoint", "ce.pt", "--id", "tiny", "--ood", "tiny_uniform", "--detector", "msp",
     "--out", " "],
    ["report", "fig3", "--run", "a=m.jsonl", "--out", ""],
    ["report", "reproduction", "t.csv", "--md", "", "--csv", "r.csv"],
    ["dg", "table", "--inputs", "x", "--out", ""],
    ["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--out", ""],
])
def test_an_empty_output_flag_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine\n")
    (tmp_path / "metrics.jsonl").write_text("mine\n")
    rc, err = cli(argv, capsys)
    line = one_line(err)
    flag = next(a.split("=")[0] for a in argv if a.split("=")[0] in ("--out", "--md"))
    assert rc == 2 and f"{flag} is empty" in line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (tmp_path / "config.yaml").read_text() == "mine\n"


def test_a_non_empty_directory_greg_did_not_make_is_refused(tmp_path, capsys):
    for name, run in (("train", train), ("evaluate", evaluate)):
        out = tmp_path / f"{name}-mine"
        out.mkdir()
        (out / "config.yaml").write_text("mine\n")
        (out / "metrics.jsonl").write_text("mine\n")
        rc, err = run(tmp_path, out, capsys)
        line = one_line(err)
        assert rc == 2 and f"{out} is not empty and was not made by greg" in line, err
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]
        assert (out / "config.yaml").read_text() == "mine\n"
    # an empty directory (what Snakemake creates for a job's outputs) and greg's own directory are fine
    out = tmp_path / "empty"
    out.mkdir()
    rc, err = train(tmp_path, out, capsys)
    assert rc == 0 and (out / "final.pt").is_file() and (out / gio.LOCK_NAME).is_file(), err
    rc, err = train(tmp_path, out, capsys)
    assert rc == 0 and "already complete" in err, err


def test_dg_run_refuses_a_non_empty_directory_greg_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("mine\n")
    rc, err = cli(["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--out", out, "--steps", "1",
                   "--restarts", "1", "--device", "cpu"], capsys)
    line = one_line(err)
    assert rc == 2 and f"{out} is not empty and was not made by greg" in line, err
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"] and (out / "results.csv").read_text() == "mine\n"
    # a directory of an earlier greg dg run (no lock file then) whose config.json is this run's: resumed
    argv = ["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--steps", "1", "--restarts", "1",
            "--device", "cpu", "--out"]
    assert cli([*argv, tmp_path / "run"], capsys)[0] == 0
    (tmp_path / "run" / gio.LOCK_NAME).unlink()
    results = (tmp_path / "run" / "results.csv").read_text()
    rc, err = cli([*argv, tmp_path / "run"], capsys)
    assert rc == 0 and (tmp_path / "run" / "results.csv").read_text() == results, err
    assert (tmp_path / "run" / gio.LOCK_NAME).is_file()
    # a user's config.json of something else is no such mark
    (out / "config.json").write_text('{"dataset": "colored_digits"}')
    rc, err = cli([*argv, out], capsys)
    assert rc == 2 and "not made by greg" in one_line(err) and not (out / gio.LOCK_NAME).exists(), err


# ------------------------------------------------------------------------------------------ no flock


def _no_flock(monkeypatch, code=errno.ENOSYS):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_flock_an_exclusive_lock_file_holds_host_and_pid(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch)
    d = tmp_path / "run"
    owner = d / gio.EXCL_LOCK_NAME
    with gio.dir_lock(d, "run directory"):
        assert owner.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        held = pytest.raises(gio.LockedError, match=f"in use by another process \\(pid {os.getpid()} on ")
        with held, gio.dir_lock(d, "run directory"):
            pass
        assert owner.exists()  # the refused second locker did not remove the holder's file
    assert not owner.exists()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "WARNING" in ln]
    assert len(warnings) == 2 and all(f"locking with {owner} instead" in w for w in warnings)

    # a holder killed on this host (dead pid): its file is replaced; one on another host is refused
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    owner.write_text(f"pid {dead} on {socket.gethostname()}\n")
    with gio.dir_lock(d):
        assert owner.read_text().startswith(f"pid {os.getpid()} ")
    owner.write_text("pid 1 on node-elsewhere\n")
    with pytest.raises(gio.LockedError, match="pid 1 on node-elsewhere"), gio.dir_lock(d):
        pass
    owner.unlink()
    victim = tmp_path / "mine.txt"
    victim.write_text("mine\n")
    owner.symlink_to(victim)
    with pytest.raises(gio.NotARunDirError, match="symbolic link"), gio.dir_lock(d):
        pass
    assert victim.read_text() == "mine\n"


def test_train_on_a_filesystem_without_flock_warns_once_and_runs(tmp_path, monkeypatch, capsys):
    _no_flock(monkeypatch)
    out = tmp_path / "run"
    rc, err = train(tmp_path, out, capsys)
    assert rc == 0 and (out / "final.pt").is_file(), err
    assert len([ln for ln in err.splitlines() if "flock unavailable" in ln]) == 1
    assert not (out / gio.EXCL_LOCK_NAME).exists()
    # GREG_LOCK=file chooses the lock file where flock works but is node-local (BeeGFS)
    monkeypatch.undo()
    monkeypatch.setenv("GREG_LOCK", "file")
    with gio.dir_lock(out):
        assert (out / gio.EXCL_LOCK_NAME).is_file()
    # any other flock failure is still an error, not a silent fallback
    _no_flock(monkeypatch, errno.EIO)
    monkeypatch.delenv("GREG_LOCK")
    with pytest.raises(OSError, match="Input/output error"), gio.dir_lock(out):
        pass
