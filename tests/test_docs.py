"""Every command of a fenced ```bash block in README.md and docs/*.md runs as printed.

Each block goes through bash (loops, brace expansion and line continuations as a user's shell does them) with
`greg` and `snakemake` replaced by recorders; the recorded command lines are then checked, in order, in a
temporary working copy of the repository (no data/, results/, runs/ of the user's):
- `greg ...` on the tiny benchmark runs in-process, training capped at 2 steps (`greg dg run`: 1 restart of 2
  steps);
- `greg train` on real data resolves and validates its whole config (`--print-config`); other `greg` commands on
  real data only parse their arguments (and `greg evaluate`'s checkpoint must be one the block trains);
- `snakemake ...` is dry-run (`-n`); a `--report` command dry-runs its targets (the report itself needs a
  finished run).
Lines that cannot run here are listed in SKIPPED with the reason.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from greg import cli
from greg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

# (regex on a whole command line, why it is not run here)
SKIPPED = [
    (r"\bpip install\b|-m venv\b", "installs packages"),
    (r"^\$EDITOR\b", "opens an editor"),
    (r"-m pytest\b", "the test suite itself"),
    (r"^greg data download\b(?!.*\btiny)", "downloads real datasets"),
]
REAL_DATA_NOTE = "needs the real datasets: arguments parsed only"

_NOT_COPIED = {".git", ".venv", ".snakemake", "data", "results", "runs", "report.html", ".pytest_cache",
               ".ruff_cache", "__pycache__"}
_SEP, _END = "\x1f", "\x1e"


def bash_blocks() -> list[tuple[str, int, str]]:
    """(file, line of the fence, text) of every ```bash block."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
            out.append((str(path.relative_to(ROOT)), text[: m.start()].count("\n") + 1, m.group(1)))
    return out


def logical_lines(block: str) -> list[str]:
    """Lines with their continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def skip_reason(line: str) -> str | None:
    return next((why for pat, why in SKIPPED if re.search(pat, line)), None)


def record(block: str, cwd: Path) -> list[list[str]]:
    """The argv of every greg / snakemake call the block makes (as bash expands it), in order."""
    script = ["set -euo pipefail",
              f'greg() {{ printf "%s{_SEP}" greg "$@" >> .cmds; printf "{_END}" >> .cmds; }}',
              f'snakemake() {{ printf "%s{_SEP}" snakemake "$@" >> .cmds; printf "{_END}" >> .cmds; }}']
    for line in logical_lines(block):
        if skip_reason(line) is None:
            assert re.match(r"(greg|snakemake|for|done)\b", line), f"not a greg/snakemake command: {line}"
            script.append(line)
    (cwd / ".cmds").unlink(missing_ok=True)
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, check=True, timeout=60)
    text = (cwd / ".cmds").read_text() if (cwd / ".cmds").exists() else ""
    return [c.split(_SEP)[:-1] for c in text.split(_END) if c]


def parser_for(command: str) -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog=f"greg {command}", exit_on_error=False)
    importlib.import_module(cli.COMMANDS[command][0]).add_arguments(p)
    return p


def run_greg(argv: list[str], trained: set[str], notes: list[str]) -> None:
    """Run (or check) one greg command line; ``trained`` collects the --out of every greg train."""
    if argv[1:2] == ["--help"]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv[1:])
        assert e.value.code == 0
        return
    command, rest = argv[1], argv[2:]
    if command == "dg" and rest[:1] == ["run"]:
        argv = argv + ["--steps", "2", "--restarts", "1", "--device", "cpu"]
    elif command == "train":
        a = parser_for("train").parse_args(rest)
        trained.add(os.path.normpath(a.out))
        if load_config(a.config, a.set)["data"]["id"] == "tiny":
            argv = argv + ["--set", "train.max_steps=2", "--set", "train.progress=false", "--device", "cpu"]
        else:
            argv = argv + ["--print-config"]  # resolves and validates the whole config; trains nothing
    elif command == "evaluate":
        a = parser_for("evaluate").parse_args(rest)
        assert os.path.normpath(Path(a.checkpoint).parent) in trained, f"{a.checkpoint}: no command trains it"
        if a.id != "tiny":
            notes.append(f"{' '.join(argv[:2])}: {REAL_DATA_NOTE}")
            return
    elif command == "data" and rest[:1] == ["verify"] and "tiny" not in rest:
        parser_for("data").parse_args(rest)
        notes.append(f"{' '.join(argv[:3])}: {REAL_DATA_NOTE}")
        return
    assert cli.main(argv[1:]) == 0, argv


def run_snakemake(argv: list[str], cwd: Path) -> None:
    args = argv[1:] + ["-n"]
    if "--report" in args:  # the report needs a finished run: dry-run what it reports on
        i = args.index("--report")
        args = args[:i] + ["-n"] + args[i + 2:-1]  # -n in its place ends a preceding --configfile's list
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, f"{' '.join(argv)} -n:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def workcopy(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("docs-copy")
    for entry in ROOT.iterdir():
        if entry.name not in _NOT_COPIED:
            (tmp / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return tmp


def test_skip_list_is_small_and_each_entry_is_used():
    lines = [line for _, _, block in bash_blocks() for line in logical_lines(block)]
    for pat, why in SKIPPED:
        assert any(re.search(pat, line) for line in lines), f"unused skip entry {pat!r} ({why})"
    skipped = [line for line in lines if skip_reason(line)]
    assert len(skipped) <= 8, skipped


@pytest.mark.timeout(600)
def test_every_documented_command_runs(workcopy, monkeypatch, capsys):
    monkeypatch.chdir(workcopy)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    blocks = bash_blocks()
    assert {f for f, _, _ in blocks} >= {"README.md", "docs/DATASETS.md", "docs/DG.md", "docs/SAM.md"}
    notes: list[str] = []
    ran = 0
    for where, line, block in blocks:
        trained: set[str] = set()
        for argv in record(block, workcopy):
            try:
                if argv[0] == "greg":
                    run_greg(argv, trained, notes)
                else:
                    run_snakemake(argv, workcopy)
            except (Exception, SystemExit) as e:  # noqa: BLE001 (any failure names the doc line)
                err = capsys.readouterr().err[-1500:]
                raise AssertionError(f"{where}:{line}: {shlex.join(argv)}\n{e}\n{err}") from None
            ran += 1
    assert ran >= 20
    print("\n".join(notes))
    # what the tiny commands made: the README's tiny runs and the SAM smoke run finished
    for run in ("runs/tiny/ce", "runs/tiny/greg", "runs/tiny/greg_plus", "runs/sam_smoke"):
        assert (workcopy / run / "final.pt").is_file(), run
    shutil.rmtree(workcopy / "runs", ignore_errors=True)
