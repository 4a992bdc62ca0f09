"""The pipeline on a real one-node SLURM cluster (tests/slurm/setup.sh): a small part of the smoke workflow
through snakemake-executor-plugin-slurm, and a `greg train` job requeued by SLURM mid-run.

Runs only with GREG_SLURM_TESTS=1 (set by .ci/slurm.sh after the cluster is up): each job costs about a
minute of scheduler polling, too slow for the main suite. Job records come from `sacct` (slurmdbd) or, when
setup.sh had to fall back to accounting_storage/none, from the jobcomp/filetxt file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from greg import io as gio

REPO = Path(__file__).resolve().parents[1]
JOBCOMP = Path("/var/log/slurm/jobcomp.txt")
ACCOUNTING = Path("/run/greg-slurm/accounting")

pytestmark = pytest.mark.skipif(
    os.environ.get("GREG_SLURM_TESTS") != "1" or shutil.which("sbatch") is None,
    reason="needs the local SLURM cluster of tests/slurm/setup.sh and GREG_SLURM_TESTS=1 (.ci/slurm.sh)",
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, env=ENV).stdout


def job_records(job_id: str) -> list[tuple[str, str]]:
    """(State, ExitCode) of every run of the job (requeues included), oldest first."""
    if ACCOUNTING.exists() and ACCOUNTING.read_text().strip() == "slurmdbd":
        out = sh("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State,ExitCode")
        return [tuple(line.split("|")) for line in out.splitlines() if line]
    recs = []
    for line in JOBCOMP.read_text().splitlines() if JOBCOMP.exists() else []:
        if line.startswith(f"JobId={job_id} "):
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            recs.append((f["JobState"], f["ExitCode"]))
    return recs


def wait_done(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sh("squeue", "-h", "-j", job_id, "-o", "%T").strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", job_id], timeout=30, check=False)
    pytest.fail(f"SLURM job {job_id} still queued/running after {timeout} s")


def test_cluster_is_up():
    assert re.search(r"\b(idle|mix)\b", sh("sinfo", "-h", "-o", "%t"))


def test_smoke_part_through_the_slurm_executor(tmp_path):
    """pretrain + evaluate of one seed (one job group = one SLURM job; the downloads are local rules)."""
    results, data = tmp_path / "results", tmp_path / "data"
    target = results / "tiny/small_cnn/pretrain/seed2/eval/energy/metrics.csv"
    cmd = [
        sys.executable, "-m", "snakemake", str(target), "--profile", "tests/slurm/profile",
        "--configfile", "config/smoke.yaml", "--config", f"results={results}", f"data_root={data}",
        "--groups", "pretrain=ci", "evaluate=ci", "evaluate_posthoc=ci",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200, check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert target.exists() and target.read_text().splitlines()[0].startswith("ood_set,")
    ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    assert ids, log[-3000:]
    for job in ids:
        recs = job_records(job)
        print(f"SLURM job {job}: {recs}")
        assert recs and recs[-1] == ("COMPLETED", "0:0"), recs


def test_requeued_train_job_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """`scontrol requeue` mid-run (SIGTERM to the job, then it runs again): the job ends COMPLETED after a
    REQUEUED record, its log says it resumed, and its weights equal those of an uninterrupted job."""
    cfg = {
        "seed": 4,
        "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
        "data": {"root": str(tmp_path / "data"), "id": "tiny", "batch_size": 32, "num_workers": 0},
        "method": {"name": "ce", "hparams": {}},
        "train": {
            "epochs": 100,
            "max_steps": 600,
            "checkpoint_every": 25,
            "grad_norm_every": 0,
            "progress": False,
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    jobs = {}
    for name in ("ref", "cut"):
        cmd = f"{sys.executable} -m greg train --config {tmp_path / 'run.yaml'} --out {tmp_path / name}"
        cmd += " --device cpu"
        out = sh(
            "sbatch", "--parsable", "--requeue", "--open-mode=append", "-c", "1", "--mem=1500", "-t", "20",
            "-J", f"greg-{name}", "-o", str(tmp_path / f"{name}.log"), "--chdir", str(REPO), "--wrap", cmd,
        )  # fmt: skip
        jobs[name] = out.strip().split(";")[0]
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        n = len(log.read_text().splitlines()) if log.exists() else 0
        if n >= 40:
            break
        time.sleep(0.5)
    assert n >= 40, (
        (tmp_path / "cut.log").read_text()[-2000:] if (tmp_path / "cut.log").exists() else "no log"
    )
    assert not (tmp_path / "cut" / "final.pt").exists(), "the run ended before the requeue: make it longer"
    sh("scontrol", "requeue", jobs["cut"])
    # slurmctld holds a requeued batch job for 120 s (EligibleTime); a test need not wait for that
    for _ in range(30):
        if sh("squeue", "-h", "-j", jobs["cut"], "-o", "%T").strip() == "PENDING":
            subprocess.run(
                ["scontrol", "update", f"JobId={jobs['cut']}", "StartTime=now"], timeout=30, check=False
            )
            break
        time.sleep(1)
    for job in jobs.values():
        wait_done(job, 600)
    text = (tmp_path / "cut.log").read_text()
    assert re.search(r"resuming .*cut from step \d+/600", text), text[-3000:]
    recs = job_records(jobs["cut"])
    print(f"requeued job {jobs['cut']}: {recs}")
    assert recs[-1] == ("COMPLETED", "0:0") and any(s == "REQUEUED" for s, _ in recs[:-1]), recs
    a = gio.safe_torch_load(tmp_path / "ref" / "final.pt")["state_dict"]
    b = gio.safe_torch_load(tmp_path / "cut" / "final.pt")["state_dict"]
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(600))
