#!/usr/bin/env bash
# Snakemake runs this once, inside the freshly created conda env, from the workflow's working directory (the
# repository root: `snakemake` is started there). Installs the `greg` package of this checkout into the env,
# editable (code changes need no env rebuild) and without dependencies (the env file provides them).
# GREG_REPO overrides the checkout's location.
set -euo pipefail
repo=${GREG_REPO:-$PWD}
if [ ! -f "$repo/greg/__init__.py" ] || [ ! -f "$repo/pyproject.toml" ]; then
  echo "post-deploy: $repo is not the greg repository (run snakemake from its root, or set GREG_REPO)" >&2
  exit 1
fi
python -m pip install --no-deps --disable-pip-version-check -q -e "$repo"
python -c "import greg, sys; print('post-deploy: greg', greg.__version__, 'from', greg.__file__)"
