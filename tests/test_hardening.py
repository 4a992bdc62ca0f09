"""Hardening: one test per class of hostile or careless input (docs/RELIABILITY.md, table
"Hostile and careless input"). Each drives the real CLI or the function the CLI calls, on the tiny benchmark
(CPU, a few training steps)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import greg.models as gm
from greg import config, figures, tables
from greg import io as gio
from greg.cli import main as greg_main
from greg.trainer import Trainer

RUN = {
    "seed": 1,
    "model": {"name": "small_cnn"},
    "data": {"id": "tiny", "batch_size": 16},
    "method": {"name": "ce"},
    "optim": {"lr": 0.05},
    "train": {"epochs": 1, "max_steps": 2, "checkpoint_every": 1, "grad_norm_every": 0, "progress": False},
}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = greg_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def errline(err: str) -> str:
    """The error line, checked to be the only line of stderr that is not a progress/log line."""
    lines = [ln for ln in err.splitlines() if ln.startswith("greg ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def run_yaml(tmp_path: Path, **over) -> Path:
    cfg = json.loads(json.dumps(RUN))
    cfg["data"]["root"] = str(tmp_path / "data")
    for k, v in over.items():
        *parents, last = k.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    p = tmp_path / f"run{len(list(tmp_path.glob('run*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def train(tmp_path: Path, out: Path, capsys, *extra: str, **over) -> tuple[int, str]:
    return cli(["train", "--config", run_yaml(tmp_path, **over), "--out", out, *extra], capsys)


# ------------------------------------------------------------------------- temp files of others kept
def test_train_removes_only_its_own_temp_files_of_dead_writers(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / gio.LOCK_NAME).write_text("")  # a greg run directory (a foreign non-empty one is refused)
    host = gio._host()
    user = [".notes.tmp", ".report.tmpl", ".state.pt.tmp"]  # not greg's naming: never touched
    for n in user:
        (out / n).write_text("mine")
    (out / ".x.tmp.d").mkdir()  # a directory matching the old glob blocked every run
    dead = out / f".state.pt.greg-tmp-{host}-{2**31 - 2}-abc123.tmp.pt"  # no such pid
    live = out / f".metrics.jsonl.greg-tmp-{host}-{os.getppid()}-abc123.tmp.jsonl"  # a live process
    dead.write_text("x")
    live.write_text("x")
    rc, err = train(tmp_path, out, capsys)
    assert rc == 0, err
    assert (out / "final.pt").is_file()
    assert all((out / n).read_text() == "mine" for n in user) and (out / ".x.tmp.d").is_dir()
    assert live.exists() and not dead.exists()


def test_stale_temp_files_pattern_and_other_hosts(tmp_path):
    host = gio._host()
    dead_here = tmp_path / f".a.greg-tmp-{host}-{2**31 - 2}-q1.tmp"
    other_host = tmp_path / ".a.greg-tmp-elsewhere-1-q1.tmp"
    mine = tmp_path / f".a.greg-tmp-{host}-{os.getpid()}-q1.tmp"
    for p in (dead_here, other_host, mine):
        p.write_text("")
    (tmp_path / ".b.greg-tmp-elsewhere-1-q1.tmp.d").mkdir()
    assert gio.stale_temp_files(tmp_path) == [dead_here]
    # under the directory lock no other greg writer exists, on any host
    assert gio.stale_temp_files(tmp_path, locked=True) == sorted([dead_here, other_host])
    with gio.atomic_path(tmp_path / "state.pt") as t:
        assert t.name.startswith(".state.pt.greg-tmp-") and t not in gio.stale_temp_files(tmp_path, locked=True)


# ------------------------------------------------------------------------------- one run per --out
@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the flock of a directory (raw fcntl: the lock file is the interface)."""
    procs = []

    def hold(d: Path) -> subprocess.Popen:
        d.mkdir(parents=True, exist_ok=True)
        code = (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(d / gio.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'pid {os.getpid()}'.encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_second_train_or_evaluate_on_a_locked_directory_exits_naming_the_holder(tmp_path, capsys, lock_holder):
    out = tmp_path / "run"
    holder = lock_holder(out)
    rc, err = train(tmp_path, out, capsys)
    line = errline(err)
    assert rc == 1 and f"pid {holder.pid}" in line and str(out) in line, err
    assert not (out / "final.pt").exists() and not (out / "config.yaml").exists()

    ck = tmp_path / "final.pt"
    gm.save_checkpoint(ck, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10, meta={"method": "ce"})
    ev = tmp_path / "eval"
    holder2 = lock_holder(ev)
    rc, err = cli(["evaluate", "--checkpoint", ck, "--id", "tiny", "--ood", "tiny_uniform", "--detector",
                   "energy", "--out", ev, "--device", "cpu"], capsys)
    assert rc == 1 and f"pid {holder2.pid}" in errline(err) and not (ev / "metrics.csv").exists()

    # SIGKILL of the holder: the kernel releases the lock, the next run proceeds
    holder.kill()
    holder.wait()
    rc, err = train(tmp_path, out, capsys)
    assert rc == 0, err


def test_dir_lock_is_exclusive_and_released(tmp_path):
    held = pytest.raises(gio.LockedError, match=f"pid {os.getpid()} on {socket.gethostname()}")
    with gio.dir_lock(tmp_path / "d"), held, gio.dir_lock(tmp_path / "d"):
        pass
    with gio.dir_lock(tmp_path / "d"):
        pass


# ------------------------------------------------------------------------------------ run identity
def test_existing_final_pt_is_reused_only_for_the_same_scientific_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys)[0] == 0
    first = (out / "final.pt").read_bytes()
    assert gm.read_checkpoint(out / "final.pt")["meta"]["config_hash"] == config.config_hash(
        config.load_config([run_yaml(tmp_path, **{"data.root": str(tmp_path / "data")})]))

    # runtime keys changed: still the same run
    rc, err = train(tmp_path, out, capsys, **{"data.num_workers": 2, "train.progress": True,
                                               "train.checkpoint_every": 7, "train.log_every": 3,
                                               "data.root": str(tmp_path / "elsewhere")})
    assert rc == 0 and "already complete" in err
    # another seed / method: refused, naming the keys, with the way out
    rc, err = train(tmp_path, out, capsys, seed=2, **{"optim.lr": 0.01})
    line = errline(err)
    assert rc == 2 and "optim.lr, seed" in line and "--force" in line and "--out" in line, err
    assert (out / "final.pt").read_bytes() == first
    # corrupt final.pt: an error, never "complete"
    (out / "final.pt").write_bytes(first[:200])
    rc, err = train(tmp_path, out, capsys)
    assert rc == 2 and "final.pt" in errline(err) and "complete" not in err
    (out / "final.pt").write_bytes(b"")
    rc, err = train(tmp_path, out, capsys)
    assert rc == 2 and "complete" not in err
    # --force retrains into the directory
    rc, err = train(tmp_path, out, capsys, "--force", seed=2)
    assert rc == 0 and gm.read_checkpoint(out / "final.pt")["meta"]["seed"] == 2


def test_resume_follows_the_same_rule(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, **{"train.max_steps": 3})[0] == 0
    (out / "final.pt").unlink()  # state.pt (step 3) stays: the next run resumes from it
    rc, err = train(tmp_path, out, capsys, **{"train.max_steps": 3, "data.num_workers": 1,
                                               "data.root": str(tmp_path / "other")})
    assert rc == 0 and "resuming" in err, err
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["num_workers"] == 1
    (out / "final.pt").unlink()
    rc, err = train(tmp_path, out, capsys, **{"train.max_steps": 3, "model.kwargs": {"widths": [8, 8, 8]}})
    assert rc == 2 and "state.pt" in errline(err) and "model.kwargs.widths" in err, err


# --------------------------------------------------------------------------------- run config leaves
BAD_SETS = {
    "train=null": "'train' must be a mapping, got null",
    "train.checkpoint_every=0": "'train.checkpoint_every' must be an integer >= 1",
    "schedule.milestones=[a]": "'schedule.milestones' must be a list of epoch numbers",
    "optim.betas=[]": "'optim.betas' must be a list of two numbers",
    "schedule.lr_min_ratio=-0.5": "'schedule.lr_min_ratio' must be a number in [0, 1], got -0.5",
    "init.kind=foo": "'init.kind' must be one of auto, run, pretrained",
    "model.kwargs={widthz: [4, 4, 4]}": "unknown argument 'widthz' (did you mean 'widths'?)",
    "model.kwargs=null": "'model.kwargs' must be a mapping, got null",
    "optim.lr=.nan": "'optim.lr' must be a number > 0",
    "data.num_workers=-1": "'data.num_workers' must be an integer >= 0",
    "optim.lr=[0.1": "VALUE is not valid YAML",
    # values checked against the model constructor's annotations (widths: Sequence[int])
    "model.kwargs.widths=abc": "model.kwargs: argument 'widths' must be Sequence[int], got str ('abc')",
    "model.kwargs.widths='16'": "model.kwargs: argument 'widths' must be Sequence[int], got str ('16')",
    "data.id=tiny_aux": "'data.id' must be an ID dataset (one with classes: ",
    "data.aux=tiny": "'data.aux' is the ID set 'tiny'",
    "train.max_steps=0": "'train.max_steps' must be an integer >= 1 or null, got 0",
    f"seed={2**70}": "'seed' must be an integer in [0, 4294967295], got 1180591620717411303424",
    "optim.name=rmsprop": "'optim.name' must be one of adam, sgd, got 'rmsprop'",
}


@pytest.mark.parametrize("item", list(BAD_SETS))
def test_bad_run_config_value_is_one_line_exit_2_before_anything_runs(item, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = cli(["train", "--config", run_yaml(tmp_path), "--set", item, "--out", out], capsys)
    assert rc == 2 and BAD_SETS[item] in errline(err), err
    assert not out.exists()


BAD_HPARAMS = {
    ("oe", "lambda_oe=-1"): "method 'oe': lambda_oe must be >= 0, got -1",
    ("oe", "lambda_oe=abc"): "method 'oe': hparam 'lambda_oe' must be a finite number, got str ('abc')",
    ("energy", "lambda_S='0.1'"): "method 'energy': hparam 'lambda_S' must be a finite number, got str ('0.1')",
    ("greg_plus", "n_clusters=1.7"): "method 'greg_plus': hparam 'n_clusters' must be an integer or null, got float",
    ("dos", "kmeans_kwargs=3"): "method 'dos': hparam 'kmeans_kwargs' must be a mapping or null, got int (3)",
    ("poem", "update_every=1.5"): "method 'poem': hparam 'update_every' must be a string or an integer",
    ("oe", "grad_m_in=low"): "method 'oe': hparam 'grad_m_in' must be a finite number or null, got str ('low')",
}


@pytest.mark.parametrize("method,item", list(BAD_HPARAMS))
def test_bad_method_hparam_is_one_line_exit_2(method, item, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = cli(["train", "--config", run_yaml(tmp_path), "--set", f"method.name={method}", "--set",
                   "data.aux=tiny_aux", "--set", f"method.hparams.{item}", "--out", out], capsys)
    assert rc == 2 and BAD_HPARAMS[method, item] in errline(err), err
    assert not out.exists()


def test_hostile_config_files_are_one_line_exit_2(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"seed: 1\n\x80\x81\xfe\xff")
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20000 + "]" * 20000)
    bomb = tmp_path / "bomb.yaml"  # 9 ** 9 = 387,420,489 values once expanded, in 9 lines
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)))
    for path, msg in [(binary, "binary.yaml: not a text file (not UTF-8 at byte 8)"),
                      (deep, "deep.yaml: not valid YAML: nested deeper than 100 levels"),
                      (bomb, "bomb.yaml: not valid YAML: more than 1,000,000 values once its aliases")]:
        rc, err = cli(["train", "--config", path, "--out", tmp_path / "run"], capsys)
        line = errline(err)
        assert rc == 2 and msg in line and len(line) < 400, err
    assert not (tmp_path / "run").exists()


def test_unknown_kmeans_kwargs_and_duplicate_yaml_keys(tmp_path, capsys):
    with pytest.raises(config.ConfigError, match=r"kmeans_kwargs \(torch backend\): unknown argument 'max_itr' "
                                                 r"\(did you mean 'max_iter'\?\)"):
        config.load_config([run_yaml(tmp_path)], [
            "method.name=greg_plus", "data.aux=tiny_aux", "method.hparams.kmeans_backend=torch",
            "method.hparams.kmeans_kwargs={max_itr: 10}"])
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\noptim:\n  lr: 0.1\n  lr: 0.2\n")
    rc, err = cli(["train", "--config", dup, "--out", tmp_path / "run"], capsys)
    assert rc == 2 and "duplicate key 'lr' (first on line 3)" in errline(err), err
    assert gio.yaml_load("a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n") == {"a": {"b": 1}, "c": {"b": 2}}


# ---------------------------------------------------------------------------------- checkpoint types
def _payload():
    m = gm.create("small_cnn", 10)
    return {"format": gm.checkpoints.FORMAT, "arch": "small_cnn", "num_classes": 10, "model_kwargs": {},
            "state_dict": m.state_dict(), "meta": {}}


@pytest.mark.parametrize("key,value,expect", [
    ("model_kwargs", [1], "model_kwargs must be a dict, found list"),
    ("num_classes", "10", "num_classes must be a int, found str"),
    ("num_classes", True, "num_classes must be a int, found bool"),
    ("state_dict", [1, 2], "state_dict must be a dict, found list"),
    ("state_dict", {"w": [1.0]}, "state_dict must map names to tensors; bad entries: w"),
    ("meta", [], "meta must be a dict, found list"),
])
def test_run_checkpoint_types_are_checked(key, value, expect, tmp_path, capsys):
    bad = _payload()
    bad[key] = value
    path = tmp_path / "final.pt"
    torch.save(bad, path)
    with pytest.raises(gm.CheckpointError, match=expect):
        gm.read_checkpoint(path)
    rc, err = cli(["evaluate", "--checkpoint", path, "--id", "tiny", "--ood", "tiny_uniform", "--detector",
                   "energy", "--out", tmp_path / "ev", "--device", "cpu"], capsys)
    assert rc == 2 and str(path) in errline(err) and expect in err


@pytest.mark.parametrize("mutate,expect", [
    (lambda s: [s], "expected a dict, found list"),
    (lambda s: {**s, "rng": {k: v for k, v in s["rng"].items() if k != "numpy"}}, "no rng.'numpy' entry"),
    (lambda s: {**s, "step": "3"}, "step is a str, expected int"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "no 'optimizer' entry"),
])
def test_resume_state_types_are_checked(mutate, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys)[0] == 0
    (out / "final.pt").unlink()
    state = gio.safe_torch_load(out / "state.pt")
    torch.save(mutate(state), out / "state.pt")
    rc, err = train(tmp_path, out, capsys)
    line = errline(err)
    assert rc == 2 and str(out / "state.pt") in line and expect in line, err



def _short_groups(opt):
    return {**opt, "param_groups": [{**opt["param_groups"][0], "params": opt["param_groups"][0]["params"][:1]}]}


def _bad_buffer(opt):
    i = opt["param_groups"][0]["params"][0]
    return {**opt, "state": {**opt["state"], i: {"momentum_buffer": torch.zeros(3)}}}


@pytest.mark.parametrize("mutate,expect", [
    (lambda s: {**s, "rng": {**s["rng"], "python": s["rng"]["python"][:10]}}, "rng.python"),
    (lambda s: {**s, "rng": {**s["rng"], "numpy": s["rng"]["numpy"][:3]}}, "rng.numpy"),
    (lambda s: {**s, "rng": {**s["rng"], "numpy_pos": 5000}}, "rng.numpy"),
    (lambda s: {**s, "rng": {**s["rng"], "torch": s["rng"]["torch"][:10]}}, "rng.torch"),
    (lambda s: {**s, "rng": {**s["rng"], "cuda": "garbage"}}, "rng.cuda"),
    (lambda s: {**s, "rng": {**s["rng"], "cuda": [torch.zeros(16, dtype=torch.float32)]}}, "rng.cuda"),
    (lambda s: {**s, "rng": {**s["rng"], "cuda": [torch.zeros(16, dtype=torch.uint8),
                                                  torch.zeros(8, dtype=torch.uint8)]}}, "rng.cuda"),
    (lambda s: {**s, "optimizer": {"state": {}}}, "optimizer state has no 'param_groups'"),
    (lambda s: {**s, "optimizer": _short_groups(s["optimizer"])}, "optimizer state does not match"),
    (lambda s: {**s, "optimizer": _bad_buffer(s["optimizer"])}, "optimizer state does not match"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": [
        {**s["optimizer"]["param_groups"][0], "momentum": "abc"}]}}, "group 0 momentum is 'abc'"),
    (lambda s: {**s, "model": {k: v for k, v in s["model"].items() if k != "head.weight"}},
     "model state does not match"),
    (lambda s: {**s, "model": {**s["model"], "head.weight": torch.zeros(3, 3)}}, "model state does not match"),
    (lambda s: {**s, "step": 1000}, "step 1000 is beyond this run's 2 steps"),
])
def test_a_resume_state_that_does_not_fit_is_refused_before_use(mutate, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu")[0] == 0
    (out / "final.pt").unlink()
    log = (out / "metrics.jsonl").read_bytes()
    state = gio.safe_torch_load(out / "state.pt")
    torch.save(mutate(state), out / "state.pt")
    before = (out / "state.pt").read_bytes()
    rc, err = train(tmp_path, out, capsys, "--device", "cpu")
    line = errline(err)
    assert rc == 2 and str(out / "state.pt") in line and expect in line and len(line) < 600, err
    # nothing trained on, nothing taken as done
    assert (out / "state.pt").read_bytes() == before and not (out / "final.pt").exists()
    assert (out / "metrics.jsonl").read_bytes() == log


def test_a_gpu_runs_resume_state_resumes_on_the_cpu(tmp_path, capsys):
    # a state saved on a 2-GPU node (CUDA generator states: one 16-byte tensor per GPU) passes the check and a
    # CPU resume ignores it
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu")[0] == 0
    (out / "final.pt").unlink()
    state = gio.safe_torch_load(out / "state.pt")
    state["rng"]["cuda"] = [torch.arange(16, dtype=torch.uint8), torch.arange(16, dtype=torch.uint8)]
    torch.save(state, out / "state.pt")
    rc, err = train(tmp_path, out, capsys, "--device", "cpu")
    assert rc == 0 and (out / "final.pt").exists(), err


def test_a_method_state_that_does_not_fit_is_one_line_naming_state_pt(tmp_path, capsys):
    over = {"method": {"name": "openmix"}, "data.aux": "tiny_aux", "data.aux_batch_size": 16}
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu", **over)[0] == 0
    (out / "final.pt").unlink()
    state = gio.safe_torch_load(out / "state.pt")
    state["method"]["generator"] = state["method"]["generator"][:10]
    torch.save(state, out / "state.pt")
    rc, err = train(tmp_path, out, capsys, "--device", "cpu", **over)
    line = errline(err)
    assert rc == 2 and str(out / "state.pt") in line and "method state" in line, err
    assert not (out / "final.pt").exists()


@pytest.mark.parametrize("lines,expect", [
    (['[1, 2]'], "line 2: expected a JSON object, found list"),
    (['not json'], "line 2: not valid JSON"),
    (['{"step": "x"}'], "line 2: 'step' must be a number"),
])
def test_a_metrics_log_with_a_bad_line_is_refused_on_resume(lines, expect, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu")[0] == 0
    (out / "final.pt").unlink()
    first = (out / "metrics.jsonl").read_text().splitlines()[0]
    (out / "metrics.jsonl").write_text("\n".join([first, *lines, first]) + "\n")
    rc, err = train(tmp_path, out, capsys, "--device", "cpu")
    line = errline(err)
    assert rc == 2 and f"{out / 'metrics.jsonl'} line 2" in line and expect in line, err
    assert not (out / "final.pt").exists()


def test_a_torn_last_log_line_is_still_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu", **{"train.max_steps": 3})[0] == 0
    full = (out / "metrics.jsonl").read_text()
    (out / "final.pt").unlink()
    (out / "metrics.jsonl").write_text(full + '{"step": 7, "tot')  # killed mid-write
    rc, err = train(tmp_path, out, capsys, "--device", "cpu", **{"train.max_steps": 3})
    assert rc == 0 and "resuming" in err, err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_symlinked_metrics_log_is_never_written_through(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, out, capsys, "--device", "cpu")[0] == 0
    (out / "final.pt").unlink()
    victim = tmp_path / "notes.txt"
    victim.write_text((out / "metrics.jsonl").read_text())
    before = victim.read_text()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    rc, err = train(tmp_path, out, capsys, "--device", "cpu")
    line = errline(err)
    assert rc == 2 and "is a symbolic link" in line and str(out / "metrics.jsonl") in line, err
    assert victim.read_text() == before and not (out / "final.pt").exists()
    # the append itself opens without following a link
    with pytest.raises(gio.NotARunDirError, match="symbolic link"):
        gio.open_nofollow(out / "metrics.jsonl", "a")
    assert victim.read_text() == before


# ------------------------------------------------------------------------------------- evaluate
def _eval(tmp_path, capsys, ck, *extra):
    return cli(["evaluate", "--checkpoint", ck, "--id", "tiny", "--detector", "energy", "--out",
                tmp_path / "ev", "--device", "cpu", *extra], capsys)


def test_evaluate_refuses_wrong_output_count_id_as_ood_and_kwarg_typos(tmp_path, capsys):
    ck = tmp_path / "final.pt"
    gm.save_checkpoint(ck, gm.create("small_cnn", 11), arch="small_cnn", num_classes=11,
                       meta={"method": "ce", "extra_classes": 0})
    rc, err = _eval(tmp_path, capsys, ck, "--ood", "tiny_uniform")
    assert rc == 2 and "model has 11 outputs but tiny has 10 classes" in errline(err), err
    # a (K+1)-class method's checkpoint is fine with 11 outputs (its own detector)
    ck2 = tmp_path / "dos.pt"
    gm.save_checkpoint(ck2, gm.create("small_cnn", 11), arch="small_cnn", num_classes=11, meta={"method": "dos"})
    rc, err = cli(["evaluate", "--checkpoint", ck2, "--id", "tiny", "--detector", "absent_class", "--out",
                   tmp_path / "ev2", "--device", "cpu", "--ood", "tiny_uniform", "--n-ood", "50"], capsys)
    assert rc == 0, err

    ck10 = tmp_path / "ce.pt"
    gm.save_checkpoint(ck10, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10, meta={"method": "ce"})
    rc, err = _eval(tmp_path, capsys, ck10, "--ood", "tiny_uniform,tiny")
    assert rc == 2 and "--ood tiny: that is the ID set" in errline(err)
    rc, err = _eval(tmp_path, capsys, ck10, "--ood", "tiny_aux")
    assert rc == 2 and "not an evaluation set" in errline(err)
    rc, err = _eval(tmp_path, capsys, ck10, "--ood", "tiny_uniform", "--detector-kwargs", '{"temprature": 2}')
    assert rc == 2 and "did you mean 'temperature'?" in errline(err), err
    rc, err = cli(["evaluate", "--checkpoint", ck10, "--arch", "small_cnn", "--num-classes", "10",
                   "--model-kwargs", '{"width": [16, 32, 32]}', "--id", "tiny", "--ood", "tiny_uniform",
                   "--detector", "energy", "--out", tmp_path / "ev3", "--device", "cpu"], capsys)
    assert rc == 2 and "did you mean 'widths'?" in errline(err), err
    assert not (tmp_path / "ev" / "metrics.csv").exists()


def test_detector_kwargs_and_flags_are_checked_before_anything_runs(tmp_path, capsys):
    ck = tmp_path / "ce.pt"
    gm.save_checkpoint(ck, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10, meta={"method": "ce"})
    for detector, kwargs, msg in [
        ("react", '{"percentile": "abc"}', "detector 'react': argument 'percentile' must be float, got str ('abc')"),
        ("energy", '{"temperature": -1}', "energy detector: temperature must be > 0, got -1"),
        ("odin", '{"temperature": -1000}', "odin detector: temperature must be > 0, got -1000"),
    ]:
        rc, err = cli(["evaluate", "--checkpoint", ck, "--id", "tiny", "--detector", detector, "--out",
                       tmp_path / "ev", "--device", "cpu", "--ood", "tiny_uniform", "--detector-kwargs", kwargs], capsys)
        assert rc == 2 and msg in errline(err), err
    # integer flags: the run config's integer rule, naming the flag (argparse: usage + one error line, exit 2)
    for flag, value, msg in [("--n-ood", "-5", "argument --n-ood: must be an integer >= 0, got '-5'"),
                             ("--subsample-seed", "-1", "argument --subsample-seed: must be an integer in [0, "),
                             ("--subsample-seed", str(2**70), "argument --subsample-seed: must be an integer in"),
                             ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got '0'")]:
        with pytest.raises(SystemExit) as e:
            greg_main(["evaluate", "--checkpoint", str(ck), "--id", "tiny", "--detector", "energy", "--out",
                       str(tmp_path / "ev"), "--ood", "tiny_uniform", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"greg evaluate: error: {msg}" in err, err
    assert not (tmp_path / "ev").exists()


def test_evaluate_argument_errors_leave_no_output_directory(tmp_path, capsys):
    ck = tmp_path / "ce.pt"
    gm.save_checkpoint(ck, gm.create("small_cnn", 10), arch="small_cnn", num_classes=10, meta={"method": "ce"})
    for extra, msg in [
        (("--ood", "tiny_aux"), "not an evaluation set"),
        (("--ood", "tiny_uniform", "--detector-kwargs", '{"temprature": 2}'), "did you mean 'temperature'?"),
    ]:
        rc, err = _eval(tmp_path, capsys, ck, *extra)
        assert rc == 2 and msg in errline(err), err
    rc, err = _eval(tmp_path, capsys, tmp_path / "missing.pt", "--ood", "tiny_uniform")
    assert rc == 2 and "missing.pt" in errline(err), err
    assert not (tmp_path / "ev").exists()  # neither the directory nor its .greg.lock was created


# -------------------------------------------------------------------------------- full disk in a save
def test_disk_full_during_state_save_names_state_pt_exit_1_previous_kept(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    saves = []
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "state.pt" in Path(path).name and "w" in mode:
            saves.append(path)
            if len(saves) > 1:  # the first checkpoint fits, the disk is full at the second
                return Full(f)
        return f

    monkeypatch.setattr(gio, "open", fake_open, raising=False)
    rc, err = train(tmp_path, out, capsys, **{"train.max_steps": 3, "train.checkpoint_every": 2})
    line = errline(err)
    assert rc == 1, err
    assert line == f"greg train: [Errno 28] No space left on device: '{out / 'state.pt'}'"
    assert gio.safe_torch_load(out / "state.pt")["step"] == 2  # the previous checkpoint, intact
    assert not (out / "final.pt").exists() and not [p for p in out.iterdir() if ".greg-tmp-" in p.name]


# ------------------------------------------------------------------------------------------- greg dg
@pytest.mark.parametrize("flag,value,expect", [
    # 0 restarts or steps would "complete" with NaN statistics; seeds: the run config's seed rule
    ("--restarts", "0", "argument --restarts: must be an integer >= 1, got '0'"),
    ("--steps", "-5", "argument --steps: must be an integer >= 1, got '-5'"),
    ("--seed", str(2**70), "argument --seed: must be an integer in [0, 4294967295]"),
    ("--hparams-seed", "-1", "argument --hparams-seed: must be an integer in [0, 4294967295], got '-1'"),
])
def test_dg_run_integer_flags_share_the_run_config_rule(flag, value, expect, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        greg_main(["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--out", str(tmp_path / "dg"),
                   "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"greg dg run: error: {expect}" in err, err
    assert not (tmp_path / "dg").exists()


@pytest.mark.parametrize("argv,expect", [
    (["--set", "lr=abc"], "--set lr='abc': expected a finite float"),
    (["--set", "lrr=0.1"], "did you mean 'lr'?"),
    (["--set", "lr=[1"], "VALUE is not valid YAML"),
])
def test_dg_run_refuses_bad_arguments(argv, expect, tmp_path, capsys):
    rc, err = cli(["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--out", tmp_path / "dg",
                   "--device", "cpu", *argv], capsys)
    assert rc == 2 and expect in errline(err), err
    assert not (tmp_path / "dg" / "summary.json").exists()


def test_one_set_parser_for_every_cli(monkeypatch, tmp_path):
    """greg train (greg.config.load_config) and greg dg run both hand --set items to greg.config.parse_set:
    a CLI with a parser of its own never calls it and fails here."""
    import greg.dg.cli as dg_cli
    from greg.dg.cli import _parse_set

    calls, real = [], config.parse_set
    spy = lambda items: calls.append(list(items)) or real(items)
    monkeypatch.setattr(config, "parse_set", spy)
    monkeypatch.setattr(dg_cli, "parse_set", spy)
    assert _parse_set(["lr=1e-3"], {"lr": 0.1}) == {"lr": 0.001}
    assert calls == [["lr=1e-3"]]
    cfg = config.load_config([Path(__file__).resolve().parents[1] / "config/methods/ce.yaml"], ["optim.lr=1e-3"])
    assert cfg["optim"]["lr"] == 0.001 and calls[-1] == ["optim.lr=1e-3"]


def _dg_run(d: Path, algorithm: str, val: float, test: float) -> Path:
    d.mkdir(parents=True)
    s = {"dataset": "colored_digits", "algorithm": algorithm, "n_restarts": 1, "steps": 1, "hparams": {},
         "complete": True}
    for m, v in (("train_acc", 90.0), ("val_acc", val), ("test_acc", test)):
        s[m] = {"mean": v, "std": 0.0, "stderr": math.nan}
    (d / "summary.json").write_text(json.dumps(s))
    (d / "results.csv").write_text("restart,seed,train_acc,val_acc,test_acc,seconds\n"
                                   f"0,0,90.0,{val},{test},1.0\n")
    return d


def test_dg_table_is_independent_of_input_order_and_flags_nan(tmp_path, capsys):
    a = _dg_run(tmp_path / "a", "erm", 70.0, 60.0)
    b = _dg_run(tmp_path / "b", "erm", 70.0, 65.0)  # same validation accuracy: a tie
    c = _dg_run(tmp_path / "c", "irm", math.nan, math.nan)
    d = _dg_run(tmp_path / "d", "vrex", 71.0, 62.0)
    outs = []
    for i, order in enumerate(([a, b, c, d], [d, c, b, a], [b, d, a, c])):
        rc, err = cli(["dg", "table", "--inputs", *order, "--out", tmp_path / f"t{i}.tex"], capsys)
        assert rc == 0, err
        assert f"{c}: train_acc" in err or f"{c}: val_acc" in err, err  # the NaN run warned about
        outs.append((tmp_path / f"t{i}.tex").read_text().replace(str(tmp_path), ""))
    assert outs[0] == outs[1] == outs[2]
    tex = outs[0]
    assert "60.0" in tex and "65.0" not in tex  # the tie goes to the first path (a), whatever the order
    irm = next(ln for ln in tex.splitlines() if "IRM" in ln)
    assert irm.count("n/a") == 2 and "nan" not in irm
    assert "\\textbf{62.0}" in tex  # bold ignores the NaN row


# ------------------------------------------------------------------------------------------- report
def _resolved(files):
    return {"name": "t", "fpr": "fpr95_idpos", "metrics": ["auroc"], "digits": 1,
            "groups": [{"label": "g", "columns": [{"ood": "mean", "label": "mean"}]}],
            "rows": [{"label": k, "cells": [{"na": False, "files": [f]}]} for k, f in files.items()]}


def test_nan_metric_is_a_flagged_cell_and_marks_stay_right(capsys):
    data = {"a.csv": 90.0, "b.csv": math.nan, "c.csv": 80.0, "d.csv": 70.0}
    t = tables.build_table(_resolved({"A": "a.csv", "B": "b.csv", "C": "c.csv", "D": "d.csv"}),
                           reader=lambda f: {"mean": {"auroc": data[f]}})
    vals = {label: v[0] for label, _, v in t.rows}
    assert vals["B"].mean is None and tables.format_value(vals["B"], 1, False) == "n/a"
    assert (vals["A"].style, vals["C"].style, vals["D"].style) == ("best", "second", "")
    assert "b.csv: auroc of 'mean' is nan" in capsys.readouterr().err


def test_malformed_fig3_log_line_names_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "energy": 1.0}\n{"step": 1, "energ\n')
    with pytest.raises(tables.ReportError, match=rf"{log}, line 2: not valid JSON"):
        figures.read_jsonl(log)
    log.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(tables.ReportError, match="line 2: expected a JSON object with an integer 'step'"):
        figures.read_jsonl(log)


# ------------------------------------------------------------------------------------------------ Also
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_outputs_get_the_umask_mode(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        gio.atomic_write_text(tmp_path / "a.txt", "x")
        gio.atomic_torch_save({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == mode


def test_exit_codes_documented_in_greg_help(capsys):
    with pytest.raises(SystemExit):
        greg_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("0 success", "1 I/O or environment", "2 bad input", "3 numerical", "130 interrupted",
                  "143 stopped by SIGTERM"):
        assert piece in text, piece


def test_trainer_api_keeps_working_without_a_cli(tmp_path):
    cfg = config.load_config([run_yaml(tmp_path)])
    assert Trainer(cfg, tmp_path / "r", "cpu").run() == 0
    assert Trainer(cfg, tmp_path / "r", "cpu").run() == 0  # same config: done


# ------------------------------------------------------------------------------ workflow config at parse time
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def _workflow_config() -> dict:
    return gio.yaml_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["archs"].update({"small'; rm -rf ~; '": {"model": "small_cnn"}}), "config archs: "),
    (lambda c: c["archs"].update({'a"b': {"model": "small_cnn"}}), "config archs: "),
    (lambda c: c["variants"].update({"x%s": c["variants"]["greg"]}), "config variants: 'x%s' does not match"),
    (lambda c: c["variants"].update({"{run}": c["variants"]["greg"]}), "config variants: "),
    (lambda c: c["variants"].update({"a=b": c["variants"]["greg"]}), "config variants: "),
    (lambda c: c["variants"].update({"..": c["variants"]["greg"]}), "config variants: "),
    (lambda c: c["datasets"].update({"c,d": c["datasets"]["cifar10"]}), "config datasets: "),
    (lambda c: c.update(results="results/{dataset}"), "config results: "),
    (lambda c: c.update(results="out;rm"), "config results: "),
    (lambda c: c.update(data_root="data%d"), "config data_root: "),
    (lambda c: c["figures"]["fig3"]["runs"].update({"GReg=1": "greg"}), "config figures.fig3.runs: "),
    (lambda c: c.update(seeds=[1.0e30]), "config seeds[0] must be an integer in [0, 4294967295], got float"),
    (lambda c: c.update(seeds=[2**40]), "config seeds[0] must be an integer in [0, 4294967295], got 1099511627776"),
])
def test_workflow_names_and_paths_one_safe_pattern(edit, msg):
    from greg import plan

    cfg = _workflow_config()
    plan.check_workflow_config(cfg, SCHEMA)  # the shipped config passes
    edit(cfg)
    with pytest.raises(tables.ReportError) as e:
        plan.check_workflow_config(cfg, SCHEMA)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_workflow_config_with_yte_is_refused_unless_allowed(tmp_path, monkeypatch):
    from greg import plan

    f = tmp_path / "yte.yaml"
    f.write_text("__use_yte__: true\nresults: ?'res' + 'ults'\n")
    monkeypatch.delenv("GREG_ALLOW_YTE", raising=False)
    with pytest.raises(tables.ReportError, match="yte.yaml: __use_yte__ runs the Python expressions"):
        plan.check_workflow_config(_workflow_config(), SCHEMA, [f])
    plan.check_workflow_config(_workflow_config(), SCHEMA, [ROOT / "config/config.yaml"])
    monkeypatch.setenv("GREG_ALLOW_YTE", "1")
    plan.check_workflow_config(_workflow_config(), SCHEMA, [f])
    # greg's own configs never use it
    own = [*ROOT.glob("config/**/*.yaml"), *ROOT.glob("profiles/**/*.yaml")]
    assert own and not [p for p in own if "__use_yte__" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["variants"]["energy"].setdefault("set", {}).update({"method.hparams.lambda_S": "0.1"}),
     "hparam 'lambda_S' must be a finite number, got str ('0.1')"),
    (lambda c: c["archs"]["small_cnn"].update(kwargs={"widths": "abc"}),
     "model.kwargs: argument 'widths' must be Sequence[int], got str ('abc')"),
    (lambda c: c["variants"]["oe"].setdefault("set", {}).update({"method.hparams.lambda_oe": -0.5}),
     "lambda_oe must be >= 0, got -0.5"),
])
def test_dry_run_checks_every_run_config_leaf(edit, msg):
    from greg import plan

    cfg = gio.yaml_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    cfg["archs"]["small_cnn"] = {"model": "small_cnn"}
    cells = [("cifar10", "small_cnn", r) for r in ("energy", "oe")]
    plan.check_run_configs(cfg, cells)
    edit(cfg)
    with pytest.raises(tables.ReportError, match="config: run '(energy|oe)' of cifar10/small_cnn: .*" + re.escape(msg)):
        plan.check_run_configs(cfg, cells)


# --------------------------------------------------------------------------- model size before building
# two 3x3 convs of 10**6 -> 10**6 channels: 2 * 9e12 float32 weights = 72,000 GB (the rest is < 1 GB)
HUGE = {"widths": [10**6, 10**6, 10**6]}


def test_a_checkpoint_describing_a_huge_model_is_refused_before_building(tmp_path, capsys):
    ck = tmp_path / "final.pt"
    torch.save({**_payload(), "model_kwargs": HUGE}, ck)
    with pytest.raises(gm.CheckpointError, match="describe a model of 72,000.[0-9] GB but the file.s state_dict holds 0.1 MB"):
        gm.load_checkpoint(ck)
    rc, err = cli(["evaluate", "--checkpoint", ck, "--id", "tiny", "--ood", "tiny_uniform", "--detector",
                   "energy", "--out", tmp_path / "ev", "--device", "cpu", "--root", tmp_path / "data"], capsys)
    line = errline(err)
    assert rc == 2 and str(ck) in line and "describe a model of" in line and "model_kwargs" in line, err
    # as init.checkpoint of greg train (the run's own model is small): refused in one line naming the file
    rc, err = train(tmp_path, tmp_path / "run", capsys, "--device", "cpu", **{"init.checkpoint": str(ck)})
    line = errline(err)
    assert rc == 2 and str(ck) in line and "describe a model of" in line, err
    assert not (tmp_path / "run" / "state.pt").exists()


def test_a_run_config_describing_a_huge_model_is_refused_before_building(tmp_path, capsys):
    rc, err = train(tmp_path, tmp_path / "run", capsys, "--device", "cpu", **{"model.kwargs": HUGE})
    line = errline(err)
    assert rc == 2 and "model.kwargs" in line and "describe a small_cnn of 72,000.2 GB" in line, err
    assert not (tmp_path / "run" / "state.pt").exists()
    # external weights: the sizes come from --model-kwargs / --num-classes
    ck = tmp_path / "ext.pt"
    torch.save(gm.create("small_cnn", 10).state_dict(), ck)
    for kwargs, classes in ((HUGE, 10), ({}, 10**10)):  # a 10**10-class head: 32 x 10**10 float32 = 1,280 GB
        rc, err = cli(["evaluate", "--checkpoint", ck, "--arch", "small_cnn", "--num-classes", classes,
                       "--model-kwargs", json.dumps(kwargs), "--id", "tiny", "--ood", "tiny_uniform", "--detector",
                       "energy", "--out", tmp_path / "ev", "--device", "cpu", "--root", tmp_path / "data"], capsys)
        line = errline(err)
        assert rc == 2 and "--model-kwargs and --num-classes describe a small_cnn of" in line, err
