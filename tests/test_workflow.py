"""The Snakemake workflow: config validation, dry runs (full grid, SLURM profile), lint, and the smoke run.

The smoke run executes every rule of the DAG on the tiny benchmark (CPU, 3 steps per run; DG: colored_digits,
2 restarts of 20 steps) into a temporary results/data directory and checks that the tables (Tables 1-10,
table_sam, table_dg) and figures (fig3, fig4, fig_sam) exist and parse.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"

pytestmark = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")


# What a user's runs leave in the checkout (data/ and results/ with their ready markers, .snakemake/ metadata
# and locks) must not change what a test plans: the workflow runs in a working copy of its own.
_NOT_COPIED = {".git", ".venv", ".snakemake", "data", "results", "runs", "report.html", ".pytest_cache",
               ".ruff_cache", "__pycache__"}
_WORKDIR: list[Path] = []


def workdir() -> Path:
    """A temporary working copy of the repository (links to its sources; no data/, results/, .snakemake/),
    made once per test session."""
    if not _WORKDIR:
        import atexit
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="greg-workflow-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        for entry in ROOT.iterdir():
            if entry.name not in _NOT_COPIED:
                (tmp / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        _WORKDIR.append(tmp)
    return _WORKDIR[0]


def snakemake(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=workdir(), env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run -> {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def test_full_config_dry_run_lists_the_expected_jobs():
    from greg import plan as P
    from greg.methods import METHODS

    r = snakemake("-n", "all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = job_counts(r.stdout)
    # paper tables (with the comparison) and the others
    paper = P.paper_tables(ROOT / "config/paper_results.yaml")
    assert counts["paper_table"] == len(paper) == 10
    assert counts["table"] + counts["paper_table"] == len(P.load_tables(ROOT / "config/tables.yaml"))
    assert counts["fig3"] == 1 and counts["fig4"] == 1 and counts["all"] == 1
    assert counts["reproduction"] == 1  # `all` covers every table, reproduction.md included
    assert counts["fig_sam"] == 1 and counts["table_dg"] == 1
    # Hessian alignment: (colored_digits, colored_mnist) x 8 algorithms, one download check per dataset
    assert counts["dg_run"] == 2 * 8 and counts["dg_download"] == 2
    # CE models: (cifar10 + cifar100) x 3 archs + imagenet10 x densenet121, 3 seeds each (imported ones too)
    assert counts["pretrain"] == (2 * 3 + 1) * 3
    assert counts["train"] >= 18 * 4 and counts["evaluate"] > counts["train"]
    out = r.stdout
    assert "results/cifar100/densenet100/greg_plus/seed42/final.pt" in out
    assert "results/cifar10/resnet18/pretrain/seed1234/eval/mahalanobis/metrics.csv" in out
    for run in ("pretrain", "sam_only_norm", "sam"):  # table_sam: three detectors per model
        for det in ("msp", "energy", "rankfeat"):
            assert f"results/cifar10/densenet100/{run}/seed42/eval/{det}/metrics.csv" in out
    assert "results/dg/colored_mnist/hutchinson/summary.json" in out and "results/tables/table_dg.tex" in out
    # the GReg runs train from their preset (an input of the job, so a preset edit reruns them)
    greg_job = r"rule train:\n\s+input: [^\n]*config/methods/greg\.yaml[^\n]*\n\s+output: results/\S+/greg/seed"
    assert re.search(greg_job, out)
    for method in ("poem", "dos", "openmix"):  # baselines of Tables 3/4: in the DAG, each from its preset
        assert method in METHODS and f"/{method}/seed" in out


def test_demo_target_without_the_demo_config_refuses_with_one_line():
    r = snakemake("-n", "demo")
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("ERROR")]
    assert r.returncode == 2 and len(errors) == 1 and "--configfile config/demo.yaml" in errors[0], r.stderr[-2000:]
    assert "Job stats" not in r.stdout


def test_dg_results_do_not_depend_on_where_the_data_is(tmp_path):
    """The DG download stamp lives under the results (data_root is runtime-only): after moving the data, a
    finished DG run is not planned again."""
    results = tmp_path / "results"
    (results / ".greg-ready").mkdir(parents=True)
    (results / ".greg-ready" / "dg-colored_digits").touch()
    summary = results / "dg/colored_digits/erm/summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    r = snakemake("-n", "--config", f"results={results}", f"data_root={tmp_path / 'moved'}", "--", str(summary))
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, r.stdout[-3000:]


def test_dry_run_commands_of_the_new_targets():
    """Released DenseNet-100 checkpoints imported (0 steps) as the CE models; ImageNet drops the 1k head;
    SAM runs fine-tune the CE model without outliers; fig_sam / dg commands as documented."""
    r = snakemake("-n", "-p", "--forceall", "results/cifar100/densenet100/sam/seed2/final.pt",
                  "results/imagenet10/densenet121/pretrain/seed2/final.pt", "results/figures/fig_sam.pdf",
                  "results/dg/colored_mnist/hgp/summary.json")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    cmds = [ln.split("Shell command:", 1)[1].strip() for ln in out.splitlines() if "Shell command:" in ln]
    pre = next(c for c in cmds if "--out results/cifar100/densenet100/pretrain/seed2" in c)
    assert "init.checkpoint=densenet100_cifar100_released" in pre
    assert "init.kind=pretrained" in pre and "train.epochs=0" in pre and "train.max_steps=null" in pre
    assert ("input: results/.greg-ready/cifar100, config/methods/ce.yaml, "
            "results/.greg-ready/densenet100_cifar100_released") in out
    inet = next(c for c in cmds if "--out results/imagenet10/densenet121/pretrain/seed2" in c)
    assert "init.skip_head=true" in inet and "train.epochs=20" in inet
    sam = next(c for c in cmds if "--out results/cifar100/densenet100/sam/seed2" in c)
    assert "--config config/methods/sam.yaml" in sam and "data.aux=" not in sam
    assert "init.checkpoint=results/cifar100/densenet100/pretrain/seed2/final.pt" in sam
    fig = next(c for c in cmds if " -- greg report fig-sam " in c)  # through workflow/scripts/job.py
    assert "--model 'CE (before)=results/cifar10/densenet100/pretrain/seed2/final.pt'" in fig
    assert "--ood textures,svhn,places365,lsun_crop,lsun_resize,isun" in fig and "--npz results/figures" in fig
    assert any(c.startswith("greg dg download --dataset colored_mnist --data-root data") for c in cmds)
    assert any(c.startswith("greg dg run --dataset colored_mnist --algorithm hgp --restarts 10") for c in cmds)


def test_wrong_config_key_fails_naming_it():
    r = snakemake("-n", "--config", "bogus_key=1")
    assert r.returncode != 0
    assert "bogus_key" in r.stdout + r.stderr
    r = snakemake("-n", "--config", "seeds=abc")
    assert r.returncode != 0 and "seeds" in r.stdout + r.stderr


# Deliberate: runtime-only values (data_root, device, train_set's runtime keys; JOB, the job.py path) are
# named in the shell text instead of being rule params, because a changed param reruns (and deletes) a trained
# model (docs/WORKFLOW.md, "What reruns"). The linter recommends params for them; any other lint is an error.
ALLOWED_LINT = re.compile(r"Shell command directly uses variable (config|TRAIN_RUNTIME|JOB) from outside of the rule")


def test_lint_is_clean():
    r = snakemake("--lint")
    text = r.stdout + r.stderr
    lints = re.findall(r"^\s+\* (.+)$", text, re.MULTILINE)
    unexpected = [ln for ln in lints if not ALLOWED_LINT.match(ln)]
    assert not unexpected, text[-3000:]
    assert r.returncode in (0, 1), text[-3000:]  # snakemake --lint exits 1 when it printed any lint


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the workflow's own limit is 1500 s (about 400 s on 2 idle cores), then the report
def test_smoke_run_end_to_end(tmp_path):
    import yaml

    from greg import latex
    from greg import plan as P
    from greg.methods import METHODS

    results, data = tmp_path / "results", tmp_path / "data"
    r = snakemake("--configfile", "config/smoke.yaml", "--config", f"results={results}", f"data_root={data}",
                  "--cores", "2", "all", timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    tables = P.load_tables(ROOT / "config/tables.yaml")
    full = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for name, spec in tables.items():
        tex = (results / "tables" / f"{name}.tex").read_text()
        assert tex.startswith(f"% {name}") and r"\begin{tabular}" in tex and r"\bottomrule" in tex
        lines = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and "&" in ln]
        labels = [latex.escape(row["label"]) for row in spec["rows"]]
        for label, row in zip(labels, spec["rows"]):
            # a row label may carry assumption marks ($^{\dagger}$, config/tables.yaml `assumptions`)
            line = next(ln for ln in lines if ln.split("&")[0].strip().split("$^")[0] == label)
            run = row["run"]
            method = "ce" if run == "pretrain" else P.run_method(full, run, "cifar10")
            assert method in METHODS, (name, method)
            assert "n/a" not in line, (name, line)
            assert re.search(r"\d+\.\d\d", line)
        with open(results / "tables" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["row"] for r in rows} == {row["label"] for row in spec["rows"]}
        for row in rows:
            if row["mean"] != "n/a":
                assert 0.0 <= float(row["mean"]) <= 100.0 and row["n_seeds"] == "1"
    for fig in ("fig3", "fig4", "fig_sam"):
        assert (results / "figures" / f"{fig}.pdf").read_bytes()[:4] == b"%PDF"
        assert (results / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    # fig_sam: per-sample diagnostics of 3 models (CE before, SAM-only-norm, SAM) on ID + 5 tiny OOD sets
    import numpy as np

    with np.load(results / "figures" / "fig_sam.npz") as z:
        names = set(z.files)
        assert z["CE (before)/id/head_grad_norm"].ndim == 1 and z["SAM/tiny_faces/max_logit"].size > 0
    assert {n.split("/")[0] for n in names} == {"CE (before)", "SAM-only-norm", "SAM"}
    assert {n.split("/")[1] for n in names} == {"id", "tiny_textures", "tiny_faces", "tiny_photos",
                                               "tiny_gaussian", "tiny_uniform"}
    # table_sam is a config/tables.yaml table (checked above); table_dg: 8 algorithms, 2 restarts each
    tex = (results / "tables" / "table_dg.tex").read_text()
    assert r"\begin{tabular}" in tex and "Hutchinson" in tex and r"\textbf{" in tex
    with open(results / "tables" / "table_dg.csv", newline="") as f:
        dg = list(csv.DictReader(f))
    assert sorted(r["algorithm"] for r in dg) == sorted(["erm", "irm", "vrex", "fishr", "coral", "hgp",
                                                          "hutchinson", "oracle"])
    for row in dg:
        assert row["dataset"] == "colored_digits" and row["n_restarts"] == "2"
        assert all(0.0 <= float(row[f"{m}_mean"]) <= 100.0 for m in ("train_acc", "val_acc", "test_acc"))
    # every rendered table compiles with the packages its header names (CI installs pdflatex: .ci/run)
    if shutil.which("pdflatex") or os.environ.get("GREG_REQUIRE_LATEX"):
        r = subprocess.run([sys.executable, str(ROOT / ".ci/compile_tables.py"), str(results / "tables")],
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    # the run layout of docs/WORKFLOW.md
    run = results / "tiny" / "small_cnn" / "greg_plus" / "seed42"
    assert (run / "final.pt").exists() and (run / "metrics.jsonl").exists()
    assert (run / "eval" / "energy" / "scores" / "id.npz").exists()
    # the HTML report embeds every table and figure with its caption
    html = tmp_path / "report.html"
    r = snakemake("--configfile", "config/smoke.yaml", "--config", f"results={results}", f"data_root={data}",
                  "--report", str(html), "all_tables", "all_figures")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = html.read_text()
    for name in [*tables, "table_dg", "fig3", "fig4", "fig_sam"]:
        assert f"{name}." in text
    assert "Figure 3" in text and "Figure 4" in text
    shutil.rmtree(tmp_path, ignore_errors=True)
