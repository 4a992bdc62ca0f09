"""Every command of a fenced ```bash block in README.md and docs/*.md runs as printed.

Each block goes through bash (loops, brace expansion and line continuations as a user's shell does them) with
`greg` and `snakemake` replaced by recorders; the recorded command lines are then checked, in order, in a
temporary working copy of the repository (no data/, results/, runs/ of the user's):
- `greg ...` on the tiny benchmark runs in-process, training capped at 2 steps (`greg dg run`: 1 restart of 2
  steps), except a `greg train` whose comment claims an ID accuracy (`# ... 92 % ID accuracy`): it runs as
  printed and must reach the claim within ACC_TOLERANCE points;
- what a command's comment says it writes (a path in backquotes) exists afterwards, and so does the `--out` of
  every greg command that ran (with `final.pt` for `greg train`, `metrics.csv` for `greg evaluate`);
- `greg train` on real data resolves and validates its whole config (`--print-config`); other `greg` commands on
  real data only parse their arguments (and `greg evaluate`'s checkpoint must be one the block trains);
- `snakemake ...` is dry-run (`-n`); a `--report` command dry-runs its targets (the report itself needs a
  finished run); a path in backquotes in its comment must be among the jobs' outputs.
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
# Points an accuracy claimed in a comment may differ from the run here (thread count). A claim may be a range
# (`83-88 % ID accuracy`): the CPU kind changes the float kernels, and a training run amplifies the difference.
ACC_TOLERANCE = 3.0
_ACC_CLAIM = re.compile(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))? % ID accuracy")
_PATH_CLAIM = re.compile(r"`([\w./-]+/[\w.-]+)`")

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


def commented_lines(block: str) -> list[tuple[str, str]]:
    """(command, comment) per line, continuations joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        m = re.search(r"(^|\s)#(.*)$", line)
        command = (line[: m.start()] if m else line).strip()
        if command:
            lines.append((command, m.group(2).strip() if m else ""))
    return lines


def logical_lines(block: str) -> list[str]:
    """Lines with their continuations joined, comments and blank lines dropped."""
    return [command for command, _ in commented_lines(block)]


def skip_reason(line: str) -> str | None:
    return next((why for pat, why in SKIPPED if re.search(pat, line)), None)


def record(block: str, cwd: Path) -> list[tuple[list[str], str]]:
    """(argv, comment of its doc line) of every greg / snakemake call the block makes (as bash expands it),
    in order; the doc line is found by bash's line number of the call."""
    script = ["set -euo pipefail"] + [
        f'{name}() {{ printf "%s{_SEP}" "$BASH_LINENO" {name} "$@" >> .cmds; printf "{_END}" >> .cmds; }}'
        for name in ("greg", "snakemake")
    ]
    comments = {}
    for line, comment in commented_lines(block):
        if skip_reason(line) is None:
            assert re.match(r"(greg|snakemake|for|done)\b", line), f"not a greg/snakemake command: {line}"
            script.append(line)
            comments[len(script)] = comment
    (cwd / ".cmds").unlink(missing_ok=True)
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, check=True, timeout=60)
    text = (cwd / ".cmds").read_text() if (cwd / ".cmds").exists() else ""
    calls = [c.split(_SEP)[:-1] for c in text.split(_END) if c]
    return [(argv, comments.get(int(lineno), "")) for lineno, *argv in calls]


def parser_for(command: str) -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog=f"greg {command}", exit_on_error=False)
    importlib.import_module(cli.COMMANDS[command][0]).add_arguments(p)
    return p


def accuracy_matches(got: float, claim: re.Match) -> bool:
    """``got`` lies within ACC_TOLERANCE points of the claimed value or range."""
    lo = float(claim.group(1))
    hi = float(claim.group(2) or lo)
    return lo - ACC_TOLERANCE <= got <= hi + ACC_TOLERANCE


def run_greg(argv: list[str], comment: str, trained: set[str], notes: list[str], capsys) -> None:
    """Run (or check) one greg command line and what its comment claims; ``trained`` collects the --out of
    every greg train."""
    if argv[1:2] == ["--help"]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv[1:])
        assert e.value.code == 0
        return
    command, rest = argv[1], argv[2:]
    claimed_acc = _ACC_CLAIM.search(comment)
    out = made = None  # the command's --out ("": it writes none), and what it must hold afterwards
    if command == "dg" and rest[:1] == ["run"]:
        argv = argv + ["--steps", "2", "--restarts", "1", "--device", "cpu"]
    elif command == "train":
        a = parser_for("train").parse_args(rest)
        trained.add(os.path.normpath(a.out))
        if load_config(a.config, a.set)["data"]["id"] != "tiny":
            argv = argv + ["--print-config"]  # resolves and validates the whole config; trains nothing
            out = ""  # writes nothing
        elif claimed_acc:  # as printed: the claim is about this run
            argv = argv + ["--set", "train.progress=false", "--device", "cpu"]
            out, made = a.out, "final.pt"
        else:
            argv = argv + ["--set", "train.max_steps=2", "--set", "train.progress=false", "--device", "cpu"]
            out, made = a.out, "final.pt"
    elif command == "evaluate":
        a = parser_for("evaluate").parse_args(rest)
        assert os.path.normpath(Path(a.checkpoint).parent) in trained, f"{a.checkpoint}: no command trains it"
        if a.id != "tiny":
            notes.append(f"{' '.join(argv[:2])}: {REAL_DATA_NOTE}")
            return
        out, made = a.out, "metrics.csv"
    elif command == "data" and rest[:1] == ["verify"] and "tiny" not in rest:
        parser_for("data").parse_args(rest)
        notes.append(f"{' '.join(argv[:3])}: {REAL_DATA_NOTE}")
        return
    if "--out" in argv and out is None:
        out = argv[argv.index("--out") + 1]
    capsys.readouterr()
    assert cli.main(argv[1:]) == 0, argv
    err = capsys.readouterr().err
    assert claimed_acc is None or command == "train", f"an accuracy claim on a {command} command: {comment}"
    if claimed_acc:
        got = re.findall(r"ID test accuracy (\d+(?:\.\d+)?) %", err)
        assert got, f"no ID test accuracy printed:\n{err[-1500:]}"
        assert accuracy_matches(float(got[-1]), claimed_acc), f"claimed {claimed_acc.group(0)}, got {got[-1]} %"
    if out:
        assert Path(out, made or "").exists(), f"{out}/{made or ''}: not written"
    for path in _PATH_CLAIM.findall(comment):
        assert Path(path).exists(), f"the comment says it writes {path}; it does not exist"


def run_snakemake(argv: list[str], comment: str, cwd: Path) -> None:
    args = argv[1:] + ["-n"]
    if "--report" in args:  # the report needs a finished run: dry-run what it reports on
        i = args.index("--report")
        args = args[:i] + ["-n"] + args[i + 2:-1]  # -n in its place ends a preceding --configfile's list
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(SNAKEMAKE), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, f"{' '.join(argv)} -n:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    planned = set(re.findall(r"^\s*output: (.*)$", r.stdout, re.MULTILINE))
    planned = {p.strip() for line in planned for p in line.split(",")}
    for path in _PATH_CLAIM.findall(comment):
        assert path in planned, f"{' '.join(argv)}: the comment says it makes {path}; no job writes it"


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
        for argv, comment in record(block, workcopy):
            try:
                if argv[0] == "greg":
                    run_greg(argv, comment, trained, notes, capsys)
                else:
                    run_snakemake(argv, comment, workcopy)
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


def test_comments_map_to_the_calls_bash_makes(tmp_path):
    block = ("greg data list   # one `a/b`\n"
             "for s in 1 2; do\n  greg train --set seed=$s \\\n    --out runs/x$s   # 50 % ID accuracy\ndone\n"
             "# a comment line\nsnakemake demo --configfile c.yaml   # plans `results/x.csv`\n")
    assert commented_lines(block)[0] == ("greg data list", "one `a/b`")
    calls = record(block, tmp_path)
    assert calls == [(["greg", "data", "list"], "one `a/b`"),
                     (["greg", "train", "--set", "seed=1", "--out", "runs/x1"], "50 % ID accuracy"),
                     (["greg", "train", "--set", "seed=2", "--out", "runs/x2"], "50 % ID accuracy"),
                     (["snakemake", "demo", "--configfile", "c.yaml"], "plans `results/x.csv`")]


@pytest.mark.timeout(300)
def test_a_false_claim_fails(tmp_path, monkeypatch, capsys):
    """An accuracy the run does not reach, or a file it does not write, fails the check (a 2-step run on
    tiny ends near chance)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").symlink_to(ROOT / "config", target_is_directory=True)
    argv = ["greg", "train", "--config", "config/methods/ce.yaml", "--config", "config/tiny.yaml",
            "--set", "train.max_steps=2", "--out", "runs/two"]
    with pytest.raises(AssertionError, match="claimed 95 % ID accuracy"):
        run_greg(argv, "95 % ID accuracy", set(), [], capsys)
    with pytest.raises(AssertionError, match="runs/two/nothing.csv"):
        run_greg(argv, "writes `runs/two/nothing.csv`", set(), [], capsys)
    run_greg(argv, "writes `runs/two/final.pt`", set(), [], capsys)  # a true claim passes


def test_an_accuracy_claim_is_a_value_or_a_range_within_the_tolerance():
    def ok(got, comment):
        return accuracy_matches(got, _ACC_CLAIM.search(comment))

    assert ACC_TOLERANCE == 3.0
    assert ok(85.0, "100 steps: 88 % ID accuracy") and not ok(84.9, "100 steps: 88 % ID accuracy")
    assert ok(91.0, "88 % ID accuracy") and not ok(91.1, "88 % ID accuracy")
    assert ok(80.0, "83-88 % ID accuracy") and ok(91.0, "83-88 % ID accuracy")
    assert not ok(79.9, "83-88 % ID accuracy") and not ok(91.1, "83-88 % ID accuracy")
    assert ok(92.5, "92.5 % ID accuracy") and _ACC_CLAIM.search("92.5 % ID accuracy").group(2) is None


def test_readme_sections_named_elsewhere_exist():
    """`README "Section"` in a config, rule file or doc names a heading the README has."""
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", (ROOT / "README.md").read_text(),
                                                         re.MULTILINE)}
    files = [ROOT / "Snakefile", *ROOT.glob("config/*.yaml"), *ROOT.glob("workflow/rules/*.smk"),
             *ROOT.glob("docs/*.md"), *ROOT.glob("greg/**/*.py")]
    named = {(f.relative_to(ROOT).as_posix(), m.group(1))
             for f in files for m in re.finditer(r'README "([^"]+)"', f.read_text(encoding="utf-8"))}
    assert named  # the check looks at something
    missing = sorted((f, name) for f, name in named if name not in headings)
    assert not missing, f"README has no such section: {missing}"
