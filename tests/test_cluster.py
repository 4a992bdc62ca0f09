"""Cluster readiness of the workflow: config values never reach a shell unquoted, GPU rules declare their
resources, the workflow profile groups a model's jobs (within max_job_minutes) and leaves partitions to the
site profile, a SLURM run without SLURM's commands or with the placeholder account stops with one line,
finished models never rerun for a code edit (as a non-root user), job.py keeps every attempt's log and never
retries exit 2/3, benchmarks.csv sums the benchmark files, the conda envs install greg from the checkout, the
install lines and plugin floors are consistent, and every config key is documented.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import gpu_hours as B
import job as J
from test_workflow import workdir

needs_snakemake = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed here")


def snakemake(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # in test_workflow's working copy: a user's data/, results/ and .snakemake/ change nothing here
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=workdir(), env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------ shell injection


@needs_snakemake
def test_hostile_config_values_are_refused_before_any_job(tmp_path):
    canary = tmp_path / "pwned"
    r = snakemake("-n", "--config", f"device=cpu; touch {canary}; echo", "--", "table9")
    assert r.returncode != 0 and "device" in r.stderr + r.stdout and "does not match" in r.stderr + r.stdout
    assert not canary.exists()
    # a newline in a path (the YAML way to smuggle a second command line) is refused by the schema too
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(yaml.safe_dump({"results": f"res\ntouch {canary}"}))
    r = snakemake("-n", "--configfile", str(cfg), "--", "table9")
    assert r.returncode != 0 and "results" in r.stderr + r.stdout, r.stderr[-2000:]
    assert not canary.exists()


@needs_snakemake
@pytest.mark.slow
def test_paths_with_spaces_work_end_to_end_and_runtime_settings_never_replan_a_model(tmp_path):
    """Real jobs (download, 3-step CE pretraining, 3-step GReg fine-tuning of the tiny benchmark) into results
    and data directories whose names contain spaces (quoting, job.py, greg train). Then the data root moves
    and the worker count, progress and checkpoint/log cadence change: the dry run plans no job,
    while a change of what a run computes replans it. Trained checkpoints are write-protected."""
    results, data = tmp_path / "my results", tmp_path / "my data"
    target = results / "tiny/small_cnn/greg/seed42/final.pt"
    base = ["--configfile", "config/smoke.yaml", "--config", f"results={results}"]
    r = snakemake("-n", "-p", str(target), *base, f"data_root={data}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--out '{results}/tiny/small_cnn/pretrain/seed42'" in r.stdout
    assert f"--data-root '{data}'" in r.stdout and f"--root '{data}'" in r.stdout
    r = snakemake(str(target), *base, f"data_root={data}", "--cores", "2", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert target.is_file() and (results / ".greg-ready" / "tiny").is_file()
    assert target.stat().st_mode & 0o222 == 0  # protected()
    log = results / "logs/train/tiny/small_cnn/pretrain/seed42.log"
    assert log.read_text().startswith("=== attempt 1 ")
    assert (log.parent / "seed42.attempts.log").read_text().count("=== attempt 1 ") == 1
    bench = results / "benchmarks/pretrain/tiny/small_cnn/seed42.tsv"
    assert bench.read_text().startswith("s\t")

    moved = tmp_path / "moved data"
    moved.mkdir()
    smoke = yaml.safe_load((ROOT / "config/smoke.yaml").read_text())["train_set"]

    def plan(**train_set) -> subprocess.CompletedProcess:
        extra = tmp_path / "extra.yaml"
        extra.write_text(yaml.safe_dump({"train_set": {**smoke, **train_set}}))
        return snakemake("-n", str(target), "--configfile", "config/smoke.yaml", str(extra),
                         "--config", f"results={results}", f"data_root={moved}")

    r = plan(**{"data.num_workers": 1, "train.checkpoint_every": 1, "train.progress": True,
                "train.log_every": 2})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]
    # a change of what the runs compute (batch size) replans both trainings
    r = plan(**{"data.batch_size": 8})
    assert re.search(r"^train\s+1$", r.stdout, re.MULTILINE) and re.search(r"^pretrain\s+1$", r.stdout, re.MULTILINE), r.stdout[-3000:]


def _unprivileged() -> tuple[list[str], dict]:
    """(command prefix, subprocess arguments) that run a command without root's power over file permissions,
    where protected() does not protect (root may write a read-only file). As root (CI): the user `nobody` when
    it can run this interpreter, else root with CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER removed
    (setpriv; an interpreter under /root is not reachable for nobody), for which a read-only file is
    read-only. Not root already: nothing to drop."""
    if os.geteuid() != 0:
        return [], {}
    import pwd

    nobody = pwd.getpwnam("nobody")
    user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    try:
        ok = subprocess.run([sys.executable, "-c", "import snakemake"], capture_output=True, timeout=60,
                            cwd="/", check=False, **user).returncode == 0
    except PermissionError:
        ok = False
    if ok:
        return [], user
    setpriv = shutil.which("setpriv")
    assert setpriv, "as root, this test needs the user nobody able to run Python, or setpriv (util-linux)"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"], {}


@needs_snakemake
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rule_code_edit_never_reruns_a_protected_model_as_a_non_root_user():
    """A finished pretrain job (protected final.pt), then its rule's shell text is edited: with the workflow
    profile's rerun-triggers nothing reruns. With Snakemake's default triggers (code, software-env too) the
    same run fails with ProtectedOutputException before any job, for a non-root user: what stopped grids."""
    import tempfile

    prefix, user = _unprivileged()
    wd = Path(tempfile.mkdtemp(prefix="greg-triggers-", dir="/tmp"))
    try:
        for entry in ROOT.iterdir():
            if entry.name not in (".git", ".venv", ".snakemake", "data", "results", "workflow"):
                (wd / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        shutil.copytree(ROOT / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
        if user:
            for p in [wd, *wd.rglob("*")]:
                os.lchown(p, user["user"], user["group"])
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
               "HOME": str(wd), "XDG_CACHE_HOME": str(wd / ".cache")}
        target = "results/smoke/tiny/small_cnn/pretrain/seed42/final.pt"

        def run(*extra: str) -> subprocess.CompletedProcess:
            cmd = [*prefix, str(SNAKEMAKE), "--configfile", "config/smoke.yaml", "--cores", "1", *extra, "--", target]
            return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=400,
                                  check=False, **user)

        r = run()
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        final = wd / target
        assert final.stat().st_mode & 0o222 == 0  # protected()
        probe = [*prefix, sys.executable, "-c", f"import os; print(os.access({str(final)!r}, os.W_OK))"]
        assert subprocess.run(probe, capture_output=True, text=True, check=True, **user).stdout == "False\n"
        before = final.stat().st_mtime_ns
        rule = wd / "workflow/rules/pretrain.smk"
        text = rule.read_text()
        assert '" --device {config[device]:q}' in text
        rule.write_text(text.replace('" --device {config[device]:q}', '" --device  {config[device]:q}'))

        r = run()
        assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
        r = run("--rerun-triggers", "mtime", "params", "input", "code", "software-env")
        assert r.returncode != 0 and "ProtectedOutputException" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
        assert final.stat().st_mtime_ns == before
    finally:
        shutil.rmtree(wd, ignore_errors=True)


@needs_snakemake
def test_typo_in_a_set_key_fails_the_dry_run_with_one_line():
    r = snakemake("-n", "--config", "train_set={train.epochz: 3}", "--", "table9")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "unknown config key 'train.epochz'" in errors[0] and "run 'pretrain'" in errors[0]


# ---------------------------------------------------------------------- resources, groups, account


@needs_snakemake
def test_gpu_rules_declare_their_resources_without_a_profile():
    r = snakemake("-n", "-c8", "--forceall", "results/cifar10/resnet18/greg/seed2/eval/energy/metrics.csv")
    assert r.returncode == 0, r.stderr[-3000:]
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:        .*\n)+", r.stdout)}
    for rule, runtime in (("pretrain", 720), ("train", 720), ("evaluate", 20)):
        res = re.search(r"resources: (.*)", blocks[rule]).group(1)
        assert "gpu=1" in res and f"runtime={runtime}" in res and "mem_mb=32000" in res, (rule, res)
        assert "threads: 8" in blocks[rule], blocks[rule]
    # device: cpu (the smoke config) asks for no GPU
    r = snakemake("-n", "--configfile", "config/smoke.yaml", "--forceall",
                  "results/smoke/tiny/small_cnn/pretrain/seed42/final.pt")
    assert re.search(r"rule pretrain:\n(?:        .*\n)*?        resources: .*\bgpu=0\b", r.stdout), r.stdout[-2000:]


SITE = "profiles/slurm-example"  # the example site profile (a user's own lives in ~/.config/snakemake/NAME)
WORKFLOW_PROFILE = ROOT / "profiles/default/config.yaml"


def group_blocks(out: str) -> dict[str, list[int]]:
    """Group job name -> the runtimes of its jobs, from a dry run's output (a group's jobs are indented)."""
    groups: dict[str, list[int]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\[[^\]]+\] Group job (\S+) ", line)
        if m:
            current = groups.setdefault(m.group(1), [])
        elif re.match(r"(\[|rule |Job stats)", line):
            current = None
        elif current is not None and (r := re.match(r"\s+resources: .*\bruntime=(\d+)", line)):
            current.append(int(r.group(1)))
    return groups


@needs_snakemake
def test_profile_plans_one_gpu_job_per_model():
    """Every evaluation shares its model's group: SLURM jobs = models (pretrain + train), not evaluations; no
    group runs longer than max_job_minutes (default 1440)."""
    from greg import plan as P

    r = snakemake("--profile", SITE, "-n", "all_tables")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "workflow specific profile profiles/default" in r.stderr
    stats = r.stdout.split("Job stats:", 1)[1]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)}
    assert counts["table"] + counts["paper_table"] == len(P.load_tables(ROOT / "config/tables.yaml"))
    assert counts["all_tables"] == 1 and counts["reproduction"] == 1
    assert counts["table_dg"] == 1 and counts["dg_run"] == 16
    groups = group_blocks(r.stdout)
    assert counts["evaluate"] + counts["evaluate_posthoc"] > counts["pretrain"] + counts["train"]
    assert len(groups) == counts["pretrain"] + counts["train"], (len(groups), counts)
    assert all(len(g) > 1 and sum(g) <= 1440 for g in groups.values()), groups
    # tables / figures / downloads never wait in a queue
    for rule in ("table", "fig3", "fig4", "table_dg", "download", "benchmarks"):
        assert re.search(rf"localrules:\n(?:    \w+,\n)*    {rule},", _rules_text()), rule


def test_workflow_profile_leaves_where_jobs_run_to_the_site_profile():
    """Snakemake replaces a `--profile` key by the workflow profile's (no merge inside a key): the workflow
    profile must not carry default-resources / set-resources / set-threads (the site's partitions, account)."""
    wf = yaml.safe_load(WORKFLOW_PROFILE.read_text())
    assert wf["rerun-triggers"] == ["mtime", "params", "input"]
    assert wf["set-resource-scopes"] == ["gpu=local"] and wf["resources"] == ["gpu=1"]
    assert set(wf["group-components"]) == {"model_{dataset}_{arch}_{run}_seed{seed}=1000",
                                          "model_{dataset}_{arch}_pretrain_seed{seed}=1000"}
    site = yaml.safe_load((ROOT / SITE / "config.yaml").read_text())
    assert site["executor"] == "slurm" and site["default-resources"]["slurm_account"] == "my_account"
    assert not set(wf) & set(site), set(wf) & set(site)
    assert not set(wf) & {"executor", "default-resources", "set-resources", "set-threads", "retries", "jobs"}
    assert not (ROOT / "slurm").exists()  # ./slurm would shadow a user's ~/.config/snakemake/slurm


@needs_snakemake
def test_site_profile_partitions_survive_the_workflow_profile():
    # --cores 8: a dry run caps threads at its local cores (docs/WORKFLOW.md); SLURM jobs get the rules' own
    r = snakemake("--profile", SITE, "-n", "--cores", "8", "--forceall",
                  "results/cifar10/resnet18/pretrain/seed2/final.pt", "results/dg/colored_digits/erm/summary.json")
    assert r.returncode == 0, r.stderr[-3000:]
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)+", r.stdout)}
    assert "slurm_partition=gpu" in blocks["pretrain"] and "slurm_account=my_account" in blocks["pretrain"]
    dg = blocks["dg_run"]
    assert "slurm_partition=cpu" in dg and "runtime=240" in dg and "mem_mb=8000" in dg, dg
    assert "threads: 4" in dg and "benchmark: results/benchmarks/dg_run/colored_digits/erm.tsv" in dg, dg
    assert "threads: 8" in blocks["pretrain"] and "--workers 8 " in r.stdout
    doc = (ROOT / "docs/WORKFLOW.md").read_text()
    assert "snakemake --profile greg-slurm -n --cores 64" in doc


@needs_snakemake
def test_group_runtimes_fit_max_job_minutes(tmp_path):
    """A partition limit of 10 h: training (720 min) plus evaluations would not fit; the training asks for the
    limit (its retry resumes from state.pt) and the evaluations become jobs of their own."""
    target = "results/cifar10/resnet18/pretrain/seed2/eval/{}/metrics.csv"
    evals = [target.format(d) for d in ("msp", "energy")]
    r = snakemake("--profile", SITE, "-n", "--forceall", *evals)
    assert r.returncode == 0, r.stderr[-3000:]
    # the CE model's post-hoc detectors: one evaluate_posthoc job of 7 x 20 min (lexicographic order: first)
    assert group_blocks(r.stdout) == {"model_cifar10_resnet18_pretrain_seed2": [140, 720]}
    r = snakemake("--profile", SITE, "-n", "--forceall", "--config", "max_job_minutes=600", "--", *evals)
    assert r.returncode == 0, r.stderr[-3000:]
    assert group_blocks(r.stdout) == {"model_cifar10_resnet18_pretrain_seed2": [600]}
    assert re.search(r"^rule evaluate_posthoc:\n(?:    .*\n)*    resources: .*\bruntime=140\b", r.stdout, re.MULTILINE)
    r = snakemake("-n", "--config", "max_job_minutes=10", "--", evals[0])
    assert r.returncode != 0 and "max_job_minutes" in r.stdout + r.stderr


@needs_snakemake
def test_profile_merges_the_evaluations_of_a_trained_model_into_one_job(tmp_path):
    """The model exists (no training job to connect them): its 7 post-hoc evaluations are one job of one
    process (evaluate_posthoc), and a further detector's evaluation joins it in the model's SLURM job."""
    results = tmp_path / "results"
    (results / ".greg-ready").mkdir(parents=True)
    for name in ("tiny", "tiny_aux", "tiny_textures", "tiny_faces", "tiny_photos", "tiny_gaussian", "tiny_uniform"):
        (results / ".greg-ready" / name).touch()
    run = results / "tiny/small_cnn/pretrain/seed42"
    run.mkdir(parents=True)
    time.sleep(0.05)
    (run / "final.pt").touch()  # newer than its inputs
    dets = ("msp", "odin", "energy", "react", "dice", "line", "mahalanobis", "rankfeat")
    r = snakemake("--profile", SITE, "-n", "--configfile", "config/smoke.yaml", "--config",
                  f"results={results}", f"data_root={tmp_path / 'data'}", "--",
                  *(str(run / "eval" / d / "metrics.csv") for d in dets))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^evaluate_posthoc\s+1$", r.stdout, re.MULTILINE), r.stdout[-3000:]
    assert re.search(r"^evaluate\s+1$", r.stdout, re.MULTILINE) and "pretrain " not in r.stdout
    assert set(re.findall(r"Group job (\S+) ", r.stdout)) == {"model_tiny_small_cnn_pretrain_seed42"}
    assert r.stdout.count("Group job ") == 1 and "--detector msp,odin,energy,react,dice,line,mahalanobis" in r.stdout


def _rules_text() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "workflow/rules").glob("*.smk")))


SLURM_COMMANDS = ("sbatch", "squeue", "srun", "sacct", "scontrol", "sinfo", "scancel", "sacctmgr")


def _fake_slurm(tmp_path: Path, *commands: str) -> tuple[str, Path]:
    """A PATH with this venv, every other command of PATH but SLURM's, and stand-ins for `commands` that only
    record that they ran: no real SLURM is reachable, whatever this machine has installed."""
    bin_dir, calls = tmp_path / "fake-bin", tmp_path / "slurm-calls"
    bin_dir.mkdir()
    for d in reversed(os.environ.get("PATH", "").split(os.pathsep)):
        if os.path.isdir(d):
            for entry in os.scandir(d):
                if entry.name not in SLURM_COMMANDS and os.access(entry.path, os.X_OK):
                    with contextlib.suppress(FileExistsError):
                        (bin_dir / entry.name).symlink_to(entry.path)
    for cmd in commands:
        f = bin_dir / cmd
        f.unlink(missing_ok=True)
        f.write_text(f"#!/bin/sh\necho {cmd} >> '{calls}'\nexit 1\n")
        f.chmod(0o755)
    return f"{BIN}{os.pathsep}{bin_dir}", calls


def _snakemake_with_path(path: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=workdir(), env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_snakemake
def test_placeholder_account_stops_a_real_slurm_run_with_one_line(tmp_path):
    path, calls = _fake_slurm(tmp_path, "sbatch", "squeue")
    target = f"{tmp_path}/r/cifar10/resnet18/pretrain/seed2/final.pt"
    r = _snakemake_with_path(path, "--profile", SITE, "--config", f"results={tmp_path}/r", "--", target,
                             timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "slurm_account" in ln]
    assert len(lines) == 1 and lines[0].startswith("ERROR: slurm_account is still the placeholder")
    # the command-line way names the profile's whole list (a lone slurm_account=NAME would drop the partition)
    hint = re.search(r"--default-resources (.*?) \(the whole list", lines[0]).group(1).split()
    assert sorted(hint) == ["mem_mb=8000", "runtime=60", "slurm_account=NAME", "slurm_partition=cpu"], lines[0]
    assert not (tmp_path / "r").exists() and not calls.exists()
    # a dry run plans the grid with the placeholder (a fresh clone can look before editing)
    r = snakemake("--profile", SITE, "-n", "--config", f"results={tmp_path}/r", "--", target)
    assert r.returncode == 0 and "ERROR: slurm_account" not in r.stdout + r.stderr


@needs_snakemake
@pytest.mark.timeout(200)
def test_slurm_executor_without_sbatch_stops_at_once_with_one_line(tmp_path):
    """No SLURM commands on PATH (a workstation, a login node without the module): one line, exit 1, no job
    run, no lock left behind; before, the local jobs ran and the executor hung in its shutdown."""
    path, _ = _fake_slurm(tmp_path)
    results = tmp_path / "r"
    start = time.monotonic()
    r = _snakemake_with_path(path, "--profile", SITE, "--default-resources", "slurm_account=acct",
                             "slurm_partition=cpu", "--config", f"results={results}", "--",
                             f"{results}/cifar10/resnet18/pretrain/seed2/final.pt", timeout=150)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("ERROR")]
    assert lines == [lines[0]] and "needs sbatch and squeue on PATH" in lines[0], lines
    assert time.monotonic() - start < 120 and not results.exists()
    assert not list((workdir() / ".snakemake" / "locks").glob("*"))


# ------------------------------------------------------------------------------------ job.py


def _script(tmp_path: Path, body: str) -> list[str]:
    f = tmp_path / "cmd.py"
    f.write_text(textwrap.dedent(body))
    return [sys.executable, str(f)]


def test_job_keeps_every_attempt_and_never_reruns_exit_2(tmp_path):
    log = tmp_path / "logs" / "run.log"
    runs = tmp_path / "runs.txt"
    cmd = _script(tmp_path, f"""
        import sys
        open({str(runs)!r}, "a").write("ran\\n")
        print("greg train: bad config key"); sys.exit(2)
    """)
    assert J.run(log, 1, cmd) == 2
    assert J.marker(log).read_text() == "2\n"
    assert "bad config key" in log.read_text()
    # a retry of the same invocation does not run the command again and says why
    assert J.run(log, 2, cmd) == 2
    assert runs.read_text() == "ran\n"
    assert "not retrying: attempt 1 exited 2 (bad input or config)" in log.read_text()
    hist = J.attempts_log(log).read_text()
    assert hist.count("=== attempt 1 ") == 1 and hist.count("=== attempt 2 ") == 1
    assert "bad config key" in hist  # attempt 1's output survives attempt 2's truncation of run.log
    # a new snakemake invocation (attempt 1 again) removes the marker and runs
    assert J.run(log, 1, cmd) == 2 and runs.read_text() == "ran\nran\n"


def test_job_retries_an_exit_2_that_is_not_a_greg_error(tmp_path):
    # Intel MKL that cannot be loaded under memory pressure exits the interpreter with 2 before greg runs: an
    # environment failure, which a retry on another node may cure
    log = tmp_path / "run.log"
    cmd = _script(tmp_path, """
        import sys
        print("greg train: step 1/4"); print("INTEL MKL ERROR: cannot allocate memory."); sys.exit(2)
    """)
    assert J.run(log, 1, cmd) == 2
    assert not J.marker(log).exists()
    assert "exit 2 without a greg error line: an environment failure, a retry may run" in log.read_text()
    assert J.run(log, 2, cmd) == 2 and "not retrying" not in log.read_text()  # the retry runs it
    # NaN (exit 3) reported by greg is final; argparse's usage error is greg's too
    for line, code in (("greg train: stopped: loss is nan", 3), ("greg train: error: unrecognized arguments", 2)):
        cmd = _script(tmp_path, f"import sys; print({line!r}); sys.exit({code})")
        assert J.run(log, 1, cmd) == code and J.marker(log).read_text() == f"{code}\n"


def test_job_says_what_a_sigkill_most_likely_was(tmp_path):
    log = tmp_path / "run.log"
    cmd = _script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert J.run(log, 1, cmd) == 137
    text = log.read_text()
    assert "exit 137, killed by SIGKILL: most likely the kernel's out-of-memory killer" in text
    assert "sacct -j <jobid>" in text and not J.marker(log).exists()  # retried: the next node may have room


def test_job_retries_other_failures_and_forwards_usr1(tmp_path):
    log = tmp_path / "run.log"
    ready = tmp_path / "ready"
    cmd = _script(tmp_path, f"""
        import signal, sys, time, pathlib
        def stop(signum, frame):
            print("checkpointed on", signum, flush=True); sys.exit(143)
        signal.signal(signal.SIGUSR1, stop)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, str(ROOT / "workflow/scripts/job.py"), "--log", str(log),
                          "--attempt", "1", "--", *cmd])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # what SLURM would deliver to the whole job step
    assert p.wait(timeout=30) == 143
    assert f"checkpointed on {int(signal.SIGUSR1)}" in log.read_text()
    assert not J.marker(log).exists()  # 143 (preempted) may be retried


# --------------------------------------------------------------------------------- benchmarks


def test_benchmarks_sum_gpu_hours_per_rule(tmp_path):
    root = tmp_path / "benchmarks"
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {"train/c10/r18/greg/seed2.tsv": "5400\t1:30:00\t2048.5\t1\t1\t1\t0\t0\t90\t7200\n",
             "train/c10/r18/oe/seed2.tsv": "1800\t0:30:00\t1024\t1\t1\t1\t0\t0\t90\t1800\n",
             "evaluate/c10/r18/oe/seed2/msp.tsv": "36\t0:00:36\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n",
             "dg_run/x.tsv": "3600\t1:00:00\t100\t1\t1\t1\t0\t0\t90\t3600\n"}
    for rel, row in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(head + row)
    rows = {r["rule"]: r for r in B.summarize(root, B.parse_gpus("train=1,evaluate=2"))}
    # train: (5400 + 1800) s = 2 h on 1 GPU; evaluate: 36 s = 0.01 h on 2 GPUs; dg_run: no GPU
    assert rows["train"] == {"rule": "train", "jobs": 2, "wall_hours": 2.0, "gpu_hours": 2.0,
                             "cpu_hours": 2.5, "max_rss_mb": 2048.5}
    assert rows["evaluate"]["gpu_hours"] == 0.02 and rows["evaluate"]["cpu_hours"] == 0.0
    assert rows["dg_run"]["gpu_hours"] == 0.0 and rows["dg_run"]["wall_hours"] == 1.0
    assert rows["total"]["jobs"] == 4 and rows["total"]["gpu_hours"] == 2.02
    out = tmp_path / "b.csv"
    assert B.main([str(root), "--out", str(out), "--gpus", "train=1"]) == 0
    assert out.read_text().splitlines()[0] == "rule,jobs,wall_hours,gpu_hours,cpu_hours,max_rss_mb"
    assert B.main([str(root), "--out", str(out), "--gpus", "train"]) == 2


# ----------------------------------------------------------------------------------- conda


def test_conda_envs_do_not_pip_install_a_relative_path():
    for name in ("cpu", "gpu"):
        env = yaml.safe_load((ROOT / f"envs/{name}.yaml").read_text())
        pip = next((d["pip"] for d in env["dependencies"] if isinstance(d, dict)), [])
        assert not any(p.startswith(("-e", ".", "/")) or p.endswith("..") for p in pip), pip
        conda = [d for d in env["dependencies"] if isinstance(d, str)]
        assert all("=" in d or d == "pip" for d in conda), conda  # pinned
        assert (ROOT / f"envs/{name}.post-deploy.sh").read_text() == (ROOT / "envs/cpu.post-deploy.sh").read_text()
    cpu = yaml.safe_load((ROOT / "envs/cpu.yaml").read_text())["dependencies"]
    assert "torch==2.14.1" in next(d["pip"] for d in cpu if isinstance(d, dict))  # the version .ci/run tests


def test_one_cuda_stack_and_checked_plugin_floors():
    """The GPU env holds PyTorch and faiss to one CUDA (conda-forge's cuda-version, also what
    CONDA_OVERRIDE_CUDA must name on a GPU-less login node); the pip extras pair faiss-gpu-cu12 with torch
    from PyTorch's CUDA 12 index; the SLURM plugin floors exclude the releases that hang inside a SLURM job
    (< 2.7.0) and add --ntasks-per-gpu=1 to GPU jobs (< 2.7.1)."""
    import tomllib

    gpu = [d for d in yaml.safe_load((ROOT / "envs/gpu.yaml").read_text())["dependencies"] if isinstance(d, str)]
    cuda = [d for d in gpu if d.startswith("cuda-version=")]
    assert len(cuda) == 1 and "pytorch=2.14.1" in gpu and "faiss-gpu=1.15.1" in gpu, gpu
    assert not any(d.startswith("pytorch-cuda") for d in gpu)  # the pytorch channel's selector, not conda-forge's
    version = cuda[0].split("=")[1]
    doc = (ROOT / "docs/WORKFLOW.md").read_text()
    assert f"CONDA_OVERRIDE_CUDA={version}" in doc and f"CONDA_OVERRIDE_CUDA={version}" in (ROOT / "envs/gpu.yaml").read_text()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert meta["gpu"] == ["faiss-gpu-cu12>=1.14"]
    assert "snakemake-executor-plugin-slurm>=2.7.1,<3" in meta["workflow"]
    assert "snakemake-executor-plugin-slurm-jobstep>=0.6.1,<1" in meta["workflow"]
    readme = (ROOT / "README.md").read_text()
    cpu_line = "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
    gpu_line = "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
    assert cpu_line in readme and gpu_line in readme and 'pip install -e ".[workflow,gpu]"' in readme
    assert gpu_line in doc and "580" in doc and "525.60.13" in doc


def test_post_deploy_installs_greg_into_a_fresh_env(tmp_path):
    """What Snakemake does after creating a conda env (venv stands in for conda: no channel is reachable
    here): run envs/cpu.post-deploy.sh inside the env from the repository root; greg then imports from the
    checkout. From another directory it fails with one line."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    path = f"{env / 'bin'}{os.pathsep}{os.environ['PATH']}"
    run_env = {**os.environ, "PATH": path, "VIRTUAL_ENV": str(env), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = subprocess.run(["bash", str(ROOT / "envs/cpu.post-deploy.sh")], cwd=tmp_path, env=run_env, check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not the greg repository" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "envs/cpu.post-deploy.sh")], cwd=ROOT, env=run_env, check=False,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "setuptools" in r.stdout + r.stderr and "No matching distribution" in r.stdout + r.stderr:
        pytest.skip("no package index reachable for the build backend (setuptools)")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"from {ROOT / 'greg' / '__init__.py'}" in r.stdout


# ------------------------------------------------------------------------- docs and catalog


def test_every_config_key_is_documented():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    doc = (ROOT / "config/README.md").read_text()
    for key in schema["properties"]:
        assert f"`{key}`" in doc, key
    catalog = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True


# ------------------------------------------------------------------------ trainer and CUDA


def test_rerun_after_a_kill_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch):
    """A job killed before its first checkpoint leaves metrics.jsonl (and config.yaml) but no state.pt; the
    rerun must start over (one fresh log), not fail on the log it removes ('missing file', exit 2)."""
    from greg import config
    from greg.trainer import Trainer

    cfg = config.load_config([ROOT / "config/methods/ce.yaml", ROOT / "config/tiny.yaml"],
                             ["train.max_steps=2", "train.checkpoint_every=2", "train.progress=false",
                              "train.grad_norm_every=0", "data.batch_size=16"])
    out = tmp_path / "run"
    out.mkdir()
    (out / ".greg.lock").write_text("")  # the killed run had taken the directory's lock
    (out / "metrics.jsonl").write_text('{"step": 0, "total": 1.0}\n{"step": 1, "tot')  # torn, no state.pt
    t = Trainer(cfg, out, "cpu")
    t.rundir.clear_log()
    # the log vanishing between a check and the delete (a second attempt of the same job, a requeue) is
    # not an error: an exists()-then-unlink() raised FileNotFoundError here, i.e. exit 2 "missing file"
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: True if p.name == "metrics.jsonl" else real_exists(p))
    t.rundir.clear_log()
    monkeypatch.undo()
    (out / "metrics.jsonl").write_text('{"step": 0, "total": 1.0}\n')
    assert t.run() == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1] and (out / "final.pt").is_file()


def test_require_cuda_fails_and_slurm_without_cuda_warns(monkeypatch, capsys):
    import torch

    from greg import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(device.CudaUnavailableError, match="SLURM job 4242") as e:
        device.check_cuda("auto", require=True, command="greg train")
    assert e.value.exit_code == 1
    device.check_cuda("auto", require=False, command="greg train")
    assert "greg train: WARNING: running on the CPU in SLURM job 4242" in capsys.readouterr().err
    device.check_cuda("cpu", require=False)  # an explicit CPU run is what the user asked for
    monkeypatch.delenv("SLURM_JOB_ID")
    device.check_cuda("auto", require=False)  # a laptop without CUDA: silent
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- packaging


def test_package_metadata_is_a_library_not_a_pin():
    import tomllib

    from greg import __version__

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    assert not any("==" in d for d in deps), deps  # exact pins live in .ci/run and envs/*.yaml
    assert not any(d.split(">")[0].split("<")[0] in ("pyarrow", "jsonschema", "faiss-cpu") for d in deps)
    extras = meta["project"]["optional-dependencies"]
    assert any(d.startswith("snakemake>=9") for d in extras["workflow"]) and extras["faiss"]
    assert 'torch==2.14.1' in (ROOT / ".ci/run").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and (ROOT / "greg/py.typed").exists()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["greg"]
    r = subprocess.run([str(BIN / "greg"), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"greg {__version__}"
