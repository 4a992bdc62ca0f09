"""`greg --help`, `greg train --help`, `greg data list` and argument errors answer without importing torch.

Importing torch costs 1.5-2 s on an idle machine and 15 s or more on a loaded one; a command that only
prints help, the dataset registry or a usage error has no use for it. Each case runs in a fresh interpreter
(an earlier test's import would hide one) and checks ``sys.modules`` after the command returned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (argv, exit code): help, the registry, and usage errors argparse reports before any command runs
CASES = [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["data", "list"], 0),
    (["data", "list", "--role", "ood"], 0),
    (["data", "--help"], 0),
    (["train"], 2),  # --config and --out missing
    (["train", "--config", "x.yaml", "--out", "o", "--workers", "many"], 2),
    (["data", "list", "--role", "nope"], 2),
    (["nope"], 2),
]

_PROBE = """
import json, sys
from greg import cli
try:
    code = cli.main(json.loads(sys.argv[1]))
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "scipy", "sklearn", "matplotlib") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "code"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_command_answers_without_torch(argv, code):
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
    result = json.loads(r.stderr.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}, r.stderr[-2000:]


def test_data_list_shows_every_registered_dataset():
    """The torch-free registry is the whole registry: the listing names every dataset torch-side code sees."""
    from greg import data

    r = subprocess.run([sys.executable, "-m", "greg", "data", "list"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True)
    listed = [line.split()[0] for line in r.stdout.splitlines()[1:]]
    assert listed == data.names() and "cifar10" in listed and "tiny_m" in listed
