"""The Snakemake workflow: config validation, dry runs (full grid, SLURM profile), lint, and the smoke run.

The smoke run executes every rule of the DAG on the tiny benchmark (CPU, 3 steps per run) into a temporary
results/data directory and checks that the tables and figures exist and parse.
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


def snakemake(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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
    from greg.methods import METHODS

    r = snakemake("-n", "all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = job_counts(r.stdout)
    assert counts["table"] == 10 and counts["fig3"] == 1 and counts["fig4"] == 1 and counts["all"] == 1
    # CE models: (cifar10 + cifar100) x 3 archs + imagenet10 x densenet121, 3 seeds each
    assert counts["pretrain"] == (2 * 3 + 1) * 3
    assert counts["train"] >= 18 * 4 and counts["evaluate"] > counts["train"]
    out = r.stdout
    assert "results/cifar100/densenet100/greg_plus/seed42/final.pt" in out
    assert "results/cifar10/resnet18/pretrain/seed1234/eval/mahalanobis/metrics.csv" in out
    assert "greg train --config config/methods/greg.yaml" in out or "rule train" in out
    for method in ("poem", "dos", "openmix"):  # not implemented: never in the DAG
        if method not in METHODS:
            assert f"/{method}/seed" not in out


def test_profile_dry_run_all_tables():
    r = snakemake("--profile", "slurm", "all_tables", "-n")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = job_counts(r.stdout)
    assert counts["table"] == 10 and counts["all_tables"] == 1 and counts["pretrain"] > 0


def test_wrong_config_key_fails_naming_it():
    r = snakemake("-n", "--config", "bogus_key=1")
    assert r.returncode != 0
    assert "bogus_key" in r.stdout + r.stderr
    r = snakemake("-n", "--config", "seeds=abc")
    assert r.returncode != 0 and "seeds" in r.stdout + r.stderr


def test_lint_is_clean():
    r = snakemake("--lint")
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "Lints for" not in text, text[-3000:]


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    import yaml

    from greg import report as R
    from greg.methods import METHODS

    results, data = tmp_path / "results", tmp_path / "data"
    r = snakemake("--configfile", "config/smoke.yaml", "--config", f"results={results}", f"data_root={data}",
                  "--cores", "2", "all", timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    tables = R.load_tables(ROOT / "config/tables.yaml")
    full = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for name, spec in tables.items():
        tex = (results / "tables" / f"{name}.tex").read_text()
        assert tex.startswith(f"% {name}") and r"\begin{tabular}" in tex and r"\bottomrule" in tex
        lines = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and "&" in ln]
        labels = [R.latex_escape(row["label"]) for row in spec["rows"]]
        for label, row in zip(labels, spec["rows"]):
            line = next(ln for ln in lines if ln.split("&")[0].strip() == label)
            run = row["run"]
            method = "ce" if run == "pretrain" else R.run_method(full, run, "cifar10")
            if method in METHODS:
                assert "n/a" not in line, (name, line)
                assert re.search(r"\d+\.\d\d", line)
            else:
                assert "n/a" in line, (name, line)
        with open(results / "tables" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["row"] for r in rows} == {row["label"] for row in spec["rows"]}
        for row in rows:
            if row["mean"] != "n/a":
                assert 0.0 <= float(row["mean"]) <= 100.0 and row["n_seeds"] == "1"
    for fig in ("fig3", "fig4"):
        assert (results / "figures" / f"{fig}.pdf").read_bytes()[:4] == b"%PDF"
        assert (results / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
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
    for name in [*tables, "fig3", "fig4"]:
        assert f"{name}." in text
    assert "Figure 3" in text and "Figure 4" in text
    shutil.rmtree(tmp_path, ignore_errors=True)
