"""End-to-end trainer behaviour on the tiny benchmark: outputs, exact resume, NaN stop, fine-tuning."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from greg import config, io, train, trainer
from greg.errors import EXIT_NUMERIC, EXIT_PREEMPTED
from greg.trainer import Trainer

BASE = {
    "seed": 5,
    "model": {"name": "small_cnn"},
    "data": {"id": "tiny", "aux": "tiny_aux", "batch_size": 16, "aux_batch_size": 48, "augment": True},
    "method": {"name": "greg_plus", "hparams": {"n_clusters": 8, "n_selected": 16}},
    "optim": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "cosine"},
    "train": {"epochs": 1, "max_steps": 6, "checkpoint_every": 2, "grad_norm_every": 2, "progress": False},
}


def _cfg(tmp_path, method=None, **over):
    base = dict(BASE, method={"name": method, "hparams": {}}) if method else BASE
    cfg = config.deep_merge(config.DEFAULTS, base)
    cfg["data"]["root"] = str(tmp_path / "data")
    for k, v in over.items():
        cfg = config.deep_merge(cfg, config.parse_set([f"{k}={json.dumps(v)}"]))
    config.validate(cfg)
    return cfg


def _weights(path):
    return io.safe_torch_load(path)["state_dict"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_greg_plus_run_outputs(tmp_path):
    out = tmp_path / "run"
    assert Trainer(_cfg(tmp_path), out, "cpu").run() == 0
    ck = io.safe_torch_load(out / "final.pt")
    assert ck["arch"] == "small_cnn" and ck["num_classes"] == 10
    assert ck["meta"]["method"] == "greg_plus" and ck["meta"]["steps"] == 6
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(6))
    for key in ("total", "ce", "energy", "grad", "lr", "time"):
        assert all(key in r for r in recs), key
    # Fig. 3 diagnostic every grad_norm_every steps
    assert [r["step"] for r in recs if "score_grad_norm" in r] == [0, 2, 4]
    assert all(r["score_grad_norm"] > 0 for r in recs if "score_grad_norm" in r)
    # cosine multiplier from 1 down to 1e-3 over the 6 steps
    assert recs[0]["lr"] == pytest.approx(0.05)
    assert recs[5]["lr"] < recs[1]["lr"] < recs[0]["lr"]
    # a second run is a no-op
    mtime = (out / "final.pt").stat().st_mtime_ns
    assert Trainer(_cfg(tmp_path), out, "cpu").run() == 0
    assert (out / "final.pt").stat().st_mtime_ns == mtime


def test_interrupted_run_ends_with_identical_weights(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert Trainer(_cfg(tmp_path), ref, "cpu").run() == 0

    out = tmp_path / "cut"
    # Preempt twice (SIGTERM-style: checkpoint at the current step), at steps that are not checkpoint steps.
    for stop_after in (3, 5):
        t = Trainer(_cfg(tmp_path), out, "cpu")
        orig = t.method.compute_loss

        def compute_loss(model, batch, t=t, orig=orig, stop_after=stop_after):
            if t.step == stop_after - 1:
                t._stop_signal = signal.SIGTERM
            return orig(model, batch)

        monkeypatch.setattr(t.method, "compute_loss", compute_loss)
        assert t.run() == EXIT_PREEMPTED
        assert not (out / "final.pt").exists()
        assert io.safe_torch_load(out / "state.pt")["step"] == stop_after
    assert Trainer(_cfg(tmp_path), out, "cpu").run() == 0
    _assert_same(_weights(ref / "final.pt"), _weights(out / "final.pt"))
    # the metrics log has each step exactly once and the same losses
    a = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(6))
    assert [r["total"] for r in a] == [r["total"] for r in b]


@pytest.mark.slow
def test_sigkill_and_restart_with_same_command(tmp_path):
    """SIGKILL at an arbitrary moment; rerunning the same command resumes from the last checkpoint."""
    cfg = _cfg(
        tmp_path,
        method="greg",
        **{"train.max_steps": 30, "train.checkpoint_every": 4},
    )
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(config.config_text(cfg))
    ref, out = tmp_path / "ref", tmp_path / "cut"
    cmd = [sys.executable, "-m", "greg", "train", "--config", str(cfg_file), "--device", "cpu", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + [str(ref)], check=True, env=env)

    for kill_at_step in (6, 17):
        proc = subprocess.Popen(cmd + [str(out)], env=env)
        log = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            n = len(log.read_text().splitlines()) if log.exists() else 0
            if n >= kill_at_step or proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        assert not (out / "final.pt").exists()
    subprocess.run(cmd + [str(out)], check=True, env=env)
    _assert_same(_weights(ref / "final.pt"), _weights(out / "final.pt"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, method="energy")
    out = tmp_path / "nan"
    t = Trainer(cfg, out, "cpu")
    orig = t.method.compute_loss

    def compute_loss(model, batch):
        terms = orig(model, batch)
        if t.step == 3:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(t.method, "compute_loss", compute_loss)
    with pytest.raises(trainer.NonFiniteError, match="step 3"):
        t.run()
    state = io.safe_torch_load(out / "state.pt")
    assert state["step"] == 2  # the checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "final.pt").exists()


def test_cli_nonfinite_exit_code_and_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: small_cnn}\ntrain: {epocs: 3}\n")
    assert train.run(train_args(bad, tmp_path / "x")) == 2
    assert "train.epocs" in capsys.readouterr().err
    huge = tmp_path / "huge.yaml"
    huge.write_text(
        config.config_text(_cfg(tmp_path, method="ce", **{"optim.lr": 1e30, "optim.momentum": 0.0}))
    )
    assert train.run(train_args(huge, tmp_path / "y")) == EXIT_NUMERIC
    err = capsys.readouterr().err
    assert "non-finite" in err or "loss is nan" in err


def train_args(cfg, out):
    import argparse

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    return p.parse_args(["--config", str(cfg), "--out", str(out), "--device", "cpu"])


def test_resume_with_a_different_config_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = Trainer(_cfg(tmp_path), out, "cpu")
    t._stop_signal = signal.SIGTERM
    assert t.run() == EXIT_PREEMPTED
    with pytest.raises(config.ConfigError, match="different config") as e:
        Trainer(_cfg(tmp_path, **{"optim.lr": 0.01}), out, "cpu").run()
    # the workflow cannot pass --force: the message says what to do there
    assert "differs in optim.lr" in str(e.value) and f"delete {out} and rerun snakemake" in str(e.value)


def test_finetune_from_run_checkpoint(tmp_path):
    pre = tmp_path / "pre"
    assert Trainer(_cfg(tmp_path, method="ce"), pre, "cpu").run() == 0
    cfg = _cfg(tmp_path, method="greg", **{"init.checkpoint": str(pre / "final.pt")})
    t = Trainer(cfg, tmp_path / "ft", "cpu")
    _assert_same(_weights(pre / "final.pt"), {k: v for k, v in t.model.state_dict().items()})
    assert t.run() == 0
    wrong = _cfg(tmp_path, **{"model.name": "resnet18", "init.checkpoint": str(pre / "final.pt")})
    with pytest.raises(config.ConfigError, match="holds small_cnn"):
        Trainer(wrong, tmp_path / "wrong", "cpu")


def test_zero_steps_imports_external_weights_as_a_run(tmp_path, shared_dir):
    """epochs: 0 with init.checkpoint turns a released checkpoint into a final.pt for greg evaluate."""
    src = shared_dir / "checkpoints" / "densenet100_cifar10.pth"
    cfg = _cfg(
        tmp_path,
        method="ce",
        **{
            "model.name": "densenet100",
            "train.epochs": 0,
            "train.max_steps": None,
            "init.checkpoint": str(src),
        },
    )
    out = tmp_path / "imported"
    assert Trainer(cfg, out, "cpu").run() == 0
    from greg import models

    ref = models.load_pretrained(models.create("densenet100", 10), src)
    _assert_same(ref.state_dict(), _weights(out / "final.pt"))
    assert io.safe_torch_load(out / "final.pt")["meta"]["steps"] == 0
    with pytest.raises(config.ConfigError, match="only with init.checkpoint"):
        _cfg(tmp_path, **{"train.epochs": 0, "train.max_steps": None})


def test_skip_head_keeps_fresh_head(tmp_path):
    pre = tmp_path / "pre"
    assert Trainer(_cfg(tmp_path, method="ce"), pre, "cpu").run() == 0
    cfg = _cfg(tmp_path, method="ce", **{"init.checkpoint": str(pre / "final.pt"), "init.skip_head": True})
    t = Trainer(cfg, tmp_path / "ft", "cpu")
    w = _weights(pre / "final.pt")
    own = t.model.state_dict()
    assert all(torch.equal(own[k], w[k]) for k in w if not k.startswith("head."))
    assert not torch.equal(own["head.weight"], w["head.weight"])


def test_too_few_aux_candidates_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, **{"data.aux_batch_size": "ratio", "method.hparams.n_selected": 128})
    with pytest.raises(config.ConfigError, match=r"aux_batch_size is 12 \('ratio': 1000 auxiliary / 1297 ID"):
        Trainer(cfg, tmp_path / "run", "cpu")


def test_aux_pool_sets_ratio_and_epoch_stream(tmp_path, monkeypatch):
    # tiny: 1297 ID and 1000 aux images. A 700-image pool with batch 32: floor(700 * 32 / 1297) = 17 candidates
    # per step (the whole 1000: 24); one pass of the aux stream = one epoch of 1297 // 32 = 40 steps.
    over = {"data.batch_size": 32, "data.aux_batch_size": "ratio", "data.aux_pool_per_epoch": 700}
    t = Trainer(_cfg(tmp_path, **over), tmp_path / "run", "cpu")
    assert (t.aux_pool, t.aux_bs, t.steps_per_epoch) == (700, 17, 40)
    full = Trainer(_cfg(tmp_path, **{**over, "data.aux_pool_per_epoch": None}), tmp_path / "full", "cpu")
    assert (full.aux_pool, full.aux_bs) == (1000, 24)
    big = Trainer(_cfg(tmp_path, **{**over, "data.aux_pool_per_epoch": 10**6}), tmp_path / "big", "cpu")
    assert (big.aux_pool, big.aux_bs) == (1000, 24)  # capped at the set
    made, real = [], trainer.StreamSampler

    def spy(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(trainer, "StreamSampler", spy)
    assert Trainer(_cfg(tmp_path, **{**over, "train.max_steps": 2}), tmp_path / "run2", "cpu").run() == 0
    # (n, per_pass, seed, stream, start, stop, pool) of the aux stream
    assert made[1] == (1000, 40 * 17, 5, 2, 0, 2 * 17, 700)


def test_run_ends_with_one_summary_line(tmp_path, capsys, monkeypatch):
    """Steps, the last step's loss, ID test accuracy (of final.pt, recomputed here) and final.pt's path."""
    import dataclasses
    import re

    from greg import data, models

    out = tmp_path / "run"
    t = Trainer(_cfg(tmp_path, method="ce", **{"train.max_steps": 3}), out, "cpu")
    capsys.readouterr()
    assert t.run() == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    m = re.fullmatch(r"greg train: done: 3 steps, final loss (\S+), ID test accuracy (\S+) % \((\d+) images\); (.+)",
                     last)
    assert m, last
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["total"]
    assert float(m[1]) == pytest.approx(loss, abs=5e-5)
    test = data.load("tiny", "test", str(tmp_path / "data"))
    model, _ = models.load_checkpoint(out / "final.pt", "cpu")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.stack([test[i][0] for i in range(j, min(j + 100, len(test)))])).argmax(1)
                          for j in range(0, len(test), 100)])
    acc = 100 * sum(int(p) == test[i][1] for i, p in enumerate(pred)) / len(test)
    assert float(m[2]) == pytest.approx(acc, abs=5e-3) and int(m[3]) == len(test) == 500
    assert m[4] == str(out / "final.pt")
    # An ID set without a test split: no accuracy, the rest unchanged.
    real_spec = data.spec
    monkeypatch.setattr(data, "spec", lambda name: dataclasses.replace(real_spec(name), splits=("train",)))
    t._print_summary()
    assert capsys.readouterr().err.strip() == f"greg train: done: 3 steps, final loss {m[1]}; {out / 'final.pt'}"
