"""Reliability: the pipeline survives preemption, bad input and untrusted files.

Preemption runs real ``greg`` processes and kills them (SIGKILL / SIGTERM, at seeded random steps, from
outside or from inside at an exact point such as the middle of writing ``state.pt``), then reruns the same
command as Snakemake/SLURM would on requeue. Bad-input cases run the CLIs in-process (cheap) and check the
error names the file/key and what was expected, the exit is non-zero and earlier results are untouched.
Whether a CLI shows that error as one line or as a Python traceback is tracked separately
(``test_cli_error_is_one_line``). docs/RELIABILITY.md has the table.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import greg.models as gm
from greg import io as gio
from greg.cli import main as greg_main
from greg.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_FILES = {"config.yaml", "metrics.jsonl", "state.pt", "final.pt"}
# greg.io's temp names: .<name>.<random>.tmp[<suffix>]
TMP_RE = re.compile(r"^\.(?P<name>.+)\.greg-tmp-\w*-\d+-[a-z0-9_]+\.tmp(\.\w+)?$")  # greg.io.atomic_path
STEPS = 12

# Run in a child python: inject one fault into `greg <argv>` (GREG_FAULT, JSON), then run the CLI.
#   {"kind": "step", "at": k, "signal": "KILL"|"TERM"}: the process signals itself as step k starts
#   {"kind": "wait", "at": k, "marker": path}: as step k starts, the process creates `path` and waits for a
#       signal from outside (at most 120 s), then runs the step
#   {"kind": "write", "name": "state.pt", "at": n}: the n-th atomic write of a file with that name writes
#       half its bytes to the temp file, fsyncs, and the process SIGKILLs itself before the rename
INJECT = r"""
import contextlib, io, json, os, signal, sys
fault = json.loads(os.environ.get("GREG_FAULT", "null") or "null")
if fault and fault["kind"] in ("step", "wait"):
    import time
    from greg import trainer as T
    orig_step = T.Trainer._train_step
    def _train_step(self, batch):
        if self.step == fault["at"] and fault["kind"] == "step":
            os.kill(os.getpid(), getattr(signal, "SIG" + fault["signal"]))
        if self.step == fault["at"] and fault["kind"] == "wait":
            open(fault["marker"], "w").close()
            deadline = time.monotonic() + 120
            while self._stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return orig_step(self, batch)
    T.Trainer._train_step = _train_step
elif fault and fault["kind"] == "write":
    import greg.io as gio
    orig_open, seen = gio.atomic_open, [0]
    @contextlib.contextmanager
    def atomic_open(path, mode="w", **kw):
        if os.path.basename(str(path)) == fault["name"]:
            seen[0] += 1
            if seen[0] == fault["at"]:
                with orig_open(path, mode, **kw) as f:
                    buf = io.BytesIO() if "b" in mode else io.StringIO()
                    yield buf
                    data = buf.getvalue()
                    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                return
        with orig_open(path, mode, **kw) as f:
            yield f
    gio.atomic_open = atomic_open
from greg.cli import main
sys.exit(main(sys.argv[1:]))
"""


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def inject(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("inject") / "inject.py"
    p.write_text(INJECT)
    return p


def greg_proc(inject: Path, argv: list[str], fault: dict | None = None, timeout: float = 300, **kw):
    env = {**ENV, "GREG_FAULT": json.dumps(fault)}
    return subprocess.run(
        [sys.executable, str(inject), *argv], check=False, env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout, **kw,
    )  # fmt: skip


def run_config(tmp: Path, **over) -> Path:
    """A 12-step energy fine-tuning-style run on tiny (ID + aux streams), checkpoint every 5 steps."""
    cfg = {
        "seed": 3,
        "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
        "data": {"root": str(tmp / "data"), "id": "tiny", "aux": "tiny_aux", "batch_size": 16,
                 "aux_batch_size": 16, "num_workers": 0},
        "method": {"name": "energy", "hparams": {}},
        "optim": {"lr": 0.05},
        "train": {"max_steps": STEPS, "checkpoint_every": 5, "grad_norm_every": 4, "progress": False},
    }  # fmt: skip
    for key, v in over.items():
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    p = tmp / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def train_argv(cfg: Path, out: Path) -> list[str]:
    return ["train", "--config", str(cfg), "--out", str(out), "--device", "cpu"]


def log_steps(out: Path) -> list[int]:
    p = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in p.read_text().splitlines()] if p.exists() else []


def check_run_dir(out: Path) -> int | None:
    """Invariants after any interruption: no final.pt, only known outputs, temp files never under an output
    name, state.pt (if any) loadable with its step; returns that step."""
    assert not (out / "final.pt").exists(), "final.pt written by an interrupted run"
    names = {p.name for p in out.iterdir()}
    visible = {n for n in names if not n.startswith(".")}
    assert visible <= RUN_FILES, f"unexpected outputs {visible - RUN_FILES}"
    for n in names - visible - {gio.LOCK_NAME}:
        m = TMP_RE.match(n)
        assert m and m.group("name") in RUN_FILES, f"unexpected hidden file {n}"
    if not (out / "state.pt").exists():
        return None
    state = gio.safe_torch_load(out / "state.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    return int(state["step"])


def weights(path: Path) -> dict:
    return gio.safe_torch_load(path)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def losses(out: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["total"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inject):
    """The uninterrupted run (a real process, like the interrupted ones: same thread count)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = run_config(tmp)
    r = greg_proc(inject, train_argv(cfg, tmp / "run"))
    assert r.returncode == 0, r.stderr
    return tmp, cfg, tmp / "run"


# ---------------------------------------------------------------------------------------- preemption
def test_random_preemptions_end_with_identical_weights_and_log(reference, inject, tmp_path):
    """Seeded random kill points; each fault type once; the requeued command finishes the same run."""
    _, cfg, ref = reference
    out = tmp_path / "run"
    rng = random.Random(8)
    # steps advance between faults: each entry is (fault, expected return code)
    a, b, c = sorted(rng.sample(range(1, STEPS - 1), 3))
    plan = [
        ({"kind": "step", "at": a, "signal": "TERM"}, EXIT_PREEMPTED),  # SLURM preemption/timeout
        ({"kind": "write", "name": "state.pt", "at": 1}, -signal.SIGKILL),  # killed inside a checkpoint write
        ({"kind": "step", "at": b, "signal": "KILL"}, -signal.SIGKILL),  # node failure / OOM killer
        ({"kind": "step", "at": c, "signal": "TERM"}, EXIT_PREEMPTED),
    ]
    last_state = 0
    for fault, rc in plan:
        r = greg_proc(inject, train_argv(cfg, out), fault)
        assert r.returncode == rc, (fault, r.stderr[-2000:])
        step = check_run_dir(out)
        if fault["kind"] == "step" and fault["signal"] == "TERM":
            # SIGTERM: the current step finishes, is checkpointed and logged, then exit 143
            assert step == fault["at"] + 1 and log_steps(out) == list(range(step))
            assert "rerun to resume" in r.stderr
        elif fault["kind"] == "write":
            # the half-written checkpoint stayed a hidden temp file; state.pt is the previous good one
            assert step == last_state and any(TMP_RE.match(p.name) for p in out.iterdir())
        else:
            assert step is not None and step <= fault["at"]
        last_state = step
    r = greg_proc(inject, train_argv(cfg, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {out} from step {last_state}/{STEPS}" in r.stderr
    assert_same_weights(weights(ref / "final.pt"), weights(out / "final.pt"))
    assert losses(out) == losses(ref)  # every step once, same losses, torn/replayed lines dropped
    assert (out / "config.yaml").read_text() == (ref / "config.yaml").read_text()


def test_external_sigterm_at_random_step_exits_143_then_resumes(reference, inject, tmp_path):
    """SIGTERM sent from outside (as slurmd does) while the process is in a seeded random step; it finishes
    that step, checkpoints, exits 143, and the rerun resumes to the uninterrupted run's weights."""
    _, cfg, ref = reference
    out = tmp_path / "run"
    rng = random.Random(143)
    target = rng.randint(2, STEPS - 4)
    marker = tmp_path / "at_step"
    env = {**ENV, "GREG_FAULT": json.dumps({"kind": "wait", "at": target, "marker": str(marker)})}
    proc = subprocess.Popen(
        [sys.executable, str(inject), *train_argv(cfg, out)], env=env,
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), "the run never reached the step it waits at"
        proc.send_signal(signal.SIGTERM)  # from outside, while the process is inside step `target`
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    step = check_run_dir(out)
    assert step == target + 1 and log_steps(out) == list(range(step))  # the step it was in, then checkpoint
    r = greg_proc(inject, train_argv(cfg, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(ref / "final.pt"), weights(out / "final.pt"))
    assert losses(out) == losses(ref)


def _eval_argv(ckpt: Path, out: Path, root: Path, *extra: str, ood: str = "tiny_textures,tiny_uniform"):
    return ["evaluate", "--checkpoint", str(ckpt), "--id", "tiny", "--ood", ood, "--detector", "energy",
            "--out", str(out), "--root", str(root), "--device", "cpu", "--batch-size", "250", *extra]  # fmt: skip


def test_evaluate_and_report_killed_midway_leave_no_outputs_and_rerun_completes(reference, inject, tmp_path):
    ref_tmp, _, ref = reference
    ckpt, root = ref / "final.pt", ref_tmp / "data"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert greg_proc(inject, _eval_argv(ckpt, whole, root)).returncode == 0
    # killed while writing the second OOD set's scores (after id.npz and the first set are done)
    r = greg_proc(inject, _eval_argv(ckpt, cut, root), {"kind": "write", "name": "tiny_uniform.npz", "at": 1})
    assert r.returncode == -signal.SIGKILL
    assert not (cut / "metrics.csv").exists() and not (cut / "meta.json").exists()
    assert not (cut / "scores" / "tiny_uniform.npz").exists()
    assert [p.name for p in (cut / "scores").iterdir() if TMP_RE.match(p.name)], "the kill hit the write"
    r = greg_proc(inject, _eval_argv(ckpt, cut, root))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cut / "metrics.csv").read_bytes() == (whole / "metrics.csv").read_bytes()
    for name in ("id", "tiny_textures", "tiny_uniform"):
        with np.load(cut / "scores" / f"{name}.npz") as x, np.load(whole / "scores" / f"{name}.npz") as y:
            assert np.array_equal(x["scores"], y["scores"])

    # greg report fig3 killed while writing its PDF: neither figure exists; the rerun writes both
    fig = tmp_path / "fig" / "fig3.pdf"
    rep = ["report", "fig3", "--run", f"energy={ref / 'metrics.jsonl'}", "--out", str(fig)]
    r = greg_proc(inject, rep, {"kind": "write", "name": "fig3.pdf", "at": 1})
    assert r.returncode == -signal.SIGKILL
    assert not fig.exists() and not fig.with_suffix(".png").exists()
    r = greg_proc(inject, rep)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fig.read_bytes().startswith(b"%PDF") and fig.with_suffix(".png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ bad input
def cli(argv: list[str], capsys) -> tuple[int, str, BaseException | None]:
    """``greg argv`` in-process: (exit code, stderr + message, uncaught exception or None).

    An uncaught exception is what a user would see as a traceback (exit 1)."""
    capsys.readouterr()
    exc = None
    try:
        rc = greg_main(argv)
    except SystemExit as e:  # argparse / SystemExit(msg): one line, exit code
        rc = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        rc, exc = 1, e
    err = capsys.readouterr().err
    if exc is not None:
        err += f"\n{type(exc).__name__}: {exc}"
    return rc, err, exc


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def no_tmp(d: Path) -> list[str]:
    return [str(p) for p in d.rglob("*") if TMP_RE.match(p.name)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small_cnn run checkpoint (untrained: only its format and shapes matter here)."""
    p = tmp_path_factory.mktemp("ckpt") / "final.pt"
    torch.manual_seed(0)
    m = gm.create("small_cnn", 10, widths=[8, 16])
    gm.save_checkpoint(p, m, arch="small_cnn", num_classes=10, model_kwargs={"widths": [8, 16]}, meta={})
    return p


@pytest.fixture(scope="module")
def earlier_eval(tmp_path_factory, ckpt) -> Path:
    """A finished evaluation (scores + meta + metrics.csv) that later failures must not touch."""
    out = tmp_path_factory.mktemp("earlier") / "eval"
    assert greg_main(_eval_argv(ckpt, out, out.parent / "data", ood="tiny_uniform")) == 0
    return out


def _fake_random300k(root: Path, arr: np.ndarray | None = None, *, truncate: bool = False) -> Path:
    d = root / "random300k"
    d.mkdir(parents=True, exist_ok=True)
    (d / ".complete").write_text('{"dataset": "random300k", "files": {}}')
    f = d / "300K_random_images.npy"
    if arr is None:
        arr = np.random.default_rng(0).integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    np.save(f, arr)
    if truncate:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _aux_run_config(tmp: Path, root: Path) -> Path:
    return run_config(tmp, **{"data.root": str(root), "data.aux": "random300k", "train.max_steps": 2})


# Each case: a setup function returning (argv, words the error must contain, directory that must stay as is).
def case_corrupted_aux_checksum(tmp: Path):
    _fake_random300k(tmp / "data")
    return ["data", "verify", "random300k", "--root", str(tmp / "data")], [
        "checksum mismatch", "300K_random_images.npy", "expected md5 64ca64357de98351f28454274a112dc3",
        "got md5"], tmp / "data"  # fmt: skip


def case_truncated_aux_verify(tmp: Path):
    _fake_random300k(tmp / "data", truncate=True)
    return (
        ["data", "verify", "random300k", "--root", str(tmp / "data")],
        ["checksum mismatch", "300K_random_images.npy"],
        tmp / "data",
    )


def case_truncated_aux_train(tmp: Path):
    f = _fake_random300k(tmp / "data", truncate=True)
    return train_argv(_aux_run_config(tmp, tmp / "data"), tmp / "run"), [str(f)], tmp / "data"


def case_missing_aux_file_train(tmp: Path):
    f = _fake_random300k(tmp / "data")
    f.unlink()
    return train_argv(_aux_run_config(tmp, tmp / "data"), tmp / "run"), [str(f)], tmp / "data"


def case_missing_aux_file_verify(tmp: Path):
    f = _fake_random300k(tmp / "data")
    f.unlink()
    return (
        ["data", "verify", "random300k", "--root", str(tmp / "data")],
        [str(f), "missing", "greg data download random300k --force"],
        tmp / "data",
    )


def case_not_downloaded_train(tmp: Path):
    return (
        train_argv(_aux_run_config(tmp, tmp / "data"), tmp / "run"),
        ["random300k", "not downloaded", "greg data download random300k"],
        tmp,
    )


def case_empty_aux_set(tmp: Path):
    _fake_random300k(tmp / "data", np.zeros((0, 32, 32, 3), np.uint8))
    return (
        train_argv(_aux_run_config(tmp, tmp / "data"), tmp / "run"),
        ["auxiliary dataset 'random300k' is empty"],
        tmp / "data",
    )


def case_corrupted_cifar10_evaluate(tmp: Path):
    """A tiny fake CIFAR-10 (marker + layout present, one batch file overwritten)."""
    d = tmp / "data" / "cifar10"
    batches = d / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (d / ".complete").write_text("{}")
    for n in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(batches / n, "wb") as f:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, f)
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    ck = tmp / "ck.pt"
    gm.save_checkpoint(ck, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10)
    argv = ["evaluate", "--checkpoint", str(ck), "--id", "cifar10", "--ood", "tiny_uniform", "--detector",
            "energy", "--out", str(tmp / "eval"), "--root", str(tmp / "data"), "--device", "cpu"]  # fmt: skip
    return argv, ["cifar-10-batches-py", "checksum"], tmp / "data"


def case_wrong_arch_evaluate(tmp: Path, ckpt: Path, earlier: Path):
    argv = _eval_argv(ckpt, earlier, tmp / "data", "--arch", "resnet18", "--num-classes", "10")
    return argv, [str(ckpt), "resnet18", "missing keys"], earlier


def case_wrong_arch_train_init(tmp: Path, ckpt: Path):
    cfg = run_config(tmp, **{"model.name": "resnet18", "model.kwargs": {}, "init.checkpoint": str(ckpt)})
    return train_argv(cfg, tmp / "run"), [str(ckpt), "holds small_cnn", "resnet18"], tmp


def case_wrong_arch_train_init_pretrained(tmp: Path, ckpt: Path):
    cfg = run_config(tmp, **{"model.name": "resnet18", "model.kwargs": {}, "init.checkpoint": str(ckpt),
                             "init.kind": "pretrained"})  # fmt: skip
    return train_argv(cfg, tmp / "run"), [str(ckpt), "resnet18"], tmp


def case_unknown_key_train(tmp: Path, ckpt: Path):
    cfg = run_config(tmp, optim={"lr": 0.05, "momentun": 0.9})
    return train_argv(cfg, tmp / "run"), [str(cfg), "unknown config key 'optim.momentun'", "momentum"], tmp


def case_wrong_type_train(tmp: Path, ckpt: Path):
    cfg = run_config(tmp, optim={"lr": "fast"})
    return train_argv(cfg, tmp / "run"), [str(cfg), "'optim.lr' must be a number > 0", "'fast'"], tmp


# Another subsample seed: a new request, so the rerun must write (the same request would be skipped as done).
def case_readonly_out_evaluate(tmp: Path, ckpt: Path, earlier: Path):
    return _eval_argv(ckpt, earlier, tmp / "data", "--subsample-seed", "1", ood="tiny_uniform"), [str(earlier)], earlier


def case_full_disk_evaluate(tmp: Path, ckpt: Path, earlier: Path):
    return (
        _eval_argv(ckpt, earlier, tmp / "data", "--subsample-seed", "1", ood="tiny_uniform"),
        [str(earlier), "No space left"],
        earlier,
    )


def case_readonly_out_train(tmp: Path, ckpt: Path, earlier: Path):
    return train_argv(run_config(tmp), earlier / "run"), [str(earlier / "run")], earlier


DATA_CASES = {
    "corrupted_aux_checksum": case_corrupted_aux_checksum,
    "truncated_aux_verify": case_truncated_aux_verify,
    "truncated_aux_train": case_truncated_aux_train,
    "missing_aux_file_verify": case_missing_aux_file_verify,
    "missing_aux_file_train": case_missing_aux_file_train,
    "not_downloaded_train": case_not_downloaded_train,
    "empty_aux_set": case_empty_aux_set,
    "corrupted_cifar10_evaluate": case_corrupted_cifar10_evaluate,
}
CKPT_CASES = {
    "wrong_arch_train_init": case_wrong_arch_train_init,
    "wrong_arch_train_init_pretrained": case_wrong_arch_train_init_pretrained,
    "unknown_key_train": case_unknown_key_train,
    "wrong_type_train": case_wrong_type_train,
}
OUT_CASES = {
    "wrong_arch_evaluate": case_wrong_arch_evaluate,
    "readonly_out_evaluate": case_readonly_out_evaluate,
    "readonly_out_train": case_readonly_out_train,
    "full_disk_evaluate": case_full_disk_evaluate,
}

ALL_CASES = {**DATA_CASES, **CKPT_CASES, **OUT_CASES}


@contextlib.contextmanager
def fault_fs(name: str, d: Path):
    """Make ``d`` read-only or full for the duration: a real tmpfs when we may mount (root), else
    chmod (read-only, non-root) or os.write/fsync raising ENOSPC (full disk)."""
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        keep = d.with_name(d.name + ".keep")
        shutil.copytree(d, keep)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(d)], capture_output=True, check=False
        )
        mounted = r.returncode == 0
        if mounted:
            shutil.copytree(keep, d, dirs_exist_ok=True)
        shutil.rmtree(keep)
    try:
        if name.startswith("readonly"):
            if mounted:
                subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
                yield "tmpfs mounted read-only"
            elif os.geteuid() != 0:
                modes = {p: p.stat().st_mode for p in [d, *d.rglob("*")] if p.is_dir()}
                for p in modes:
                    p.chmod(0o555)
                try:
                    yield "chmod 555"
                finally:
                    for p, m in modes.items():
                        p.chmod(m)
            else:
                pytest.skip("root without mount: cannot make a directory read-only")
        elif mounted:
            # fill the tmpfs to the last byte
            with open(d / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            try:
                yield "tmpfs filled"
            finally:
                (d / "filler").unlink()
        else:
            orig = os.fsync

            def fsync(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            os.fsync = fsync
            try:
                yield "os.fsync raises ENOSPC"
            finally:
                os.fsync = orig
    finally:
        if mounted:
            snap = snapshot(d)
            subprocess.run(["umount", str(d)], check=True)
            for rel, data in snap.items():
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                (d / rel).write_bytes(data)


def _setup(name: str, tmp: Path, ckpt: Path, earlier_eval: Path):
    fn = ALL_CASES[name]
    if name in DATA_CASES:
        return fn(tmp)
    if name in CKPT_CASES:
        return fn(tmp, ckpt)
    earlier = tmp / "earlier"
    shutil.copytree(earlier_eval, earlier)
    if name == "readonly_out_train":  # a finished earlier run next to the evaluation
        (earlier / "run").mkdir()
        (earlier / "run" / "notes.txt").write_text("earlier results")
        (earlier / "run" / gio.LOCK_NAME).write_text("")  # made by greg (a non-empty foreign dir is refused)
    return fn(tmp, ckpt, earlier)


def _run_case(name, tmp_path, ckpt, earlier_eval, capsys):
    argv, words, keep = _setup(name, tmp_path, ckpt, earlier_eval)
    keep.mkdir(parents=True, exist_ok=True)
    fs = fault_fs(name, keep) if name.startswith(("readonly", "full_disk")) else contextlib.nullcontext()
    with fs:
        before = snapshot(keep)
        rc, err, exc = cli(argv, capsys)
        after = snapshot(keep)
    after.pop("filler", None)
    before.pop("filler", None)
    return rc, err, exc, words, before, after, keep


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_bad_input_one_clear_error_and_earlier_results_intact(name, tmp_path, ckpt, earlier_eval, capsys):
    rc, err, _, words, before, after, keep = _run_case(name, tmp_path, ckpt, earlier_eval, capsys)
    assert rc != 0, err
    assert after == before, f"{name}: files under {keep} changed: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    )
    assert not no_tmp(keep), no_tmp(keep)
    assert not (tmp_path / "run" / "final.pt").exists()
    missing = [w for w in words if w not in err]
    assert not missing, f"{name}: error lacks {missing}:\n{err}"


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_cli_error_is_one_line(name, tmp_path, ckpt, earlier_eval, capsys):
    """The same cases: the CLI reports the error itself (exit code, message) instead of a traceback."""
    rc, _, exc, *_ = _run_case(name, tmp_path, ckpt, earlier_eval, capsys)
    assert rc != 0
    assert exc is None, f"{name}: uncaught {type(exc).__name__} (a traceback for the user): {exc}"


# --------------------------------------------------------------------------- OOD set smaller than n_ood
def test_ood_set_smaller_than_n_ood_uses_all_and_records_it(tmp_path, ckpt, capsys):
    """Decision: use every image of a smaller set; metrics.csv's n_ood is the number used, meta.json keeps
    the requested n_ood (tiny_uniform has 500 images)."""
    out = tmp_path / "eval"
    rc, err, exc = cli(
        _eval_argv(ckpt, out, tmp_path / "data", "--n-ood", "100000", ood="tiny_uniform"), capsys
    )
    assert rc == 0 and exc is None, err
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("tiny_uniform,500,500,")
    with np.load(out / "scores" / "tiny_uniform.npz") as z:
        assert np.array_equal(z["index"], np.arange(500))
    assert json.loads((out / "meta.json").read_text())["n_ood"] == 100000


def test_ood_set_smaller_than_n_ood_warns(tmp_path, ckpt, capsys):
    out = tmp_path / "eval"
    rc, err, _ = cli(
        _eval_argv(ckpt, out, tmp_path / "data", "--n-ood", "100000", ood="tiny_uniform"), capsys
    )
    assert rc == 0
    assert "tiny_uniform" in err and "500" in err and "100000" in err and "warning" in err.lower()
    assert json.loads((out / "meta.json").read_text()).get("n_ood_used", {}).get("tiny_uniform") == 500


# --------------------------------------------------------------------------- workflow config schema
def test_workflow_config_unknown_key_fails_schema_validation(tmp_path):
    """The check the Snakefile runs at parse time (workflow/rules/common.smk: snakemake.utils.validate with
    workflow/schemas/config.schema.yaml), on config.yaml + smoke.yaml + a typo, as Snakemake merges them."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import update_config, validate

    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert "validate(config" in (REPO / "workflow" / "rules" / "common.smk").read_text()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((REPO / "config" / "smoke.yaml").read_text()))
    validate(dict(cfg), str(schema))  # the real configs are valid
    for typo, where in (({"seeds_": [1]}, "seeds_"), ({"datasets": {"tiny": {"oods": ["x"]}}}, "oods")):
        bad = json.loads(json.dumps(cfg))
        update_config(bad, typo)
        with pytest.raises(WorkflowError) as e:
            validate(bad, str(schema))
        assert where in str(e.value) and "Additional properties are not allowed" in str(e.value)


# --------------------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this runs ``open(marker, "w")`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused_as_checkpoint(tmp_path, capsys, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"format": "greg-model-v1", "state_dict": _Payload(marker)}
    if fmt == "torch_zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    # sanity: an unrestricted load would run it
    assert not marker.exists()

    rc, err, _ = cli(_eval_argv(evil, tmp_path / "eval", tmp_path / "data", ood="tiny_uniform"), capsys)
    assert rc != 0 and not marker.exists()
    assert str(evil) in err and "weights-only" in err
    assert not (tmp_path / "eval" / "metrics.csv").exists()

    cfg = run_config(tmp_path, **{"init.checkpoint": str(evil)})
    rc, err, _ = cli(train_argv(cfg, tmp_path / "run"), capsys)
    assert rc != 0 and not marker.exists()
    assert str(evil) in err and "weights-only" in err
    assert not (tmp_path / "run" / "final.pt").exists()

    # the same payload through plain pickle does run: the check above is meaningful
    if fmt == "raw_pickle":
        pickle.loads(evil.read_bytes())
        assert marker.exists()


# ------------------------------------------------------------------------------------------ no network
NO_NET_CHECK = r"""
import socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3)
    raise SystemExit("network reachable")
except OSError as e:
    print("network blocked:", e)
"""
BLOCK_SOCKETS = r"""
import socket
def _refuse(*args, **kwargs):
    raise OSError(101, "network blocked by the reliability test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
"""


def test_train_and_evaluate_on_tiny_with_the_network_blocked(tmp_path):
    """In a fresh network namespace (`unshare -n`: only a downed loopback) when the sandbox allows it, else
    with socket connections refused inside the process (weaker: covers Python-level network use only)."""
    probe = ["unshare", "-n", sys.executable, "-c", NO_NET_CHECK]
    use_netns = bool(shutil.which("unshare")) and (
        subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0
    )
    cfg = run_config(tmp_path, **{"train.max_steps": 3})
    run_argv = train_argv(cfg, tmp_path / "run")
    eval_argv = _eval_argv(tmp_path / "run" / "final.pt", tmp_path / "eval", tmp_path / "data")
    script = tmp_path / "run_offline.py"
    script.write_text(
        ("" if use_netns else BLOCK_SOCKETS)
        + NO_NET_CHECK
        + f"from greg.cli import main\nassert main({run_argv!r}) == 0\nassert main({eval_argv!r}) == 0\n"
        + 'print("offline run complete")\n'
    )
    cmd = (["unshare", "-n"] if use_netns else []) + [sys.executable, str(script)]
    r = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-3000:]
    assert "network blocked" in r.stdout and "offline run complete" in r.stdout
    assert (tmp_path / "run" / "final.pt").exists() and (tmp_path / "eval" / "metrics.csv").exists()
    print("network blocked with", "unshare -n" if use_netns else "socket monkeypatch")
