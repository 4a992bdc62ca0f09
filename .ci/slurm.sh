#!/usr/bin/env bash
# Reliability CI step (docs/RELIABILITY.md): start a real one-node SLURM cluster (tests/slurm/setup.sh), run
# tests/test_faults_slurm.py against it (smoke-workflow jobs through the SLURM executor, a requeued training
# job), show the job records, stop every daemon it started. Skips (exit 0) when not root / no apt-get.
# Every step is under `timeout`: this step cannot hang CI (about 5 min on 2 cores, installs included).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
timeout 900 tests/slurm/setup.sh
rc=$?
if [ $rc = 77 ]; then echo "SLURM reliability step skipped (see the SKIP line above)"; exit 0; fi
if [ $rc != 0 ]; then
  # The cluster itself could not be brought up on this CI machine (packages, daemons): say so loudly, but
  # do not fail the project's own checks on the state of the CI host. Test failures below do fail CI.
  echo "WARNING: tests/slurm/setup.sh failed ($rc): the real-SLURM reliability tests did NOT run"
  timeout 120 tests/slurm/teardown.sh
  exit 0
fi
trap 'timeout 120 tests/slurm/teardown.sh' EXIT
GREG_SLURM_TESTS=1 OMP_NUM_THREADS=1 timeout 1500 .venv/bin/python -m pytest -q -rA -s -p no:cacheprovider \
  --timeout 1300 tests/test_faults_slurm.py
rc=$?
echo "--- SLURM job records"
if [ "$(cat /run/greg-slurm/accounting 2>/dev/null)" = slurmdbd ]; then
  timeout 30 sacct -a -X -D -o JobID,JobName%24,State,ExitCode,Elapsed,Start,End
else
  cat /var/log/slurm/jobcomp.txt 2>/dev/null
fi
echo "SLURM reliability step: $(( $(date +%s) - start )) s, pytest exit $rc"
exit $rc
