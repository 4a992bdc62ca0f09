#!/usr/bin/env bash
# Stop the daemons tests/slurm/setup.sh started, by the pids it recorded (never by name).
set -uo pipefail
STATE=/run/greg-slurm
[ -d "$STATE" ] || { echo "[slurm-teardown] nothing recorded in $STATE"; exit 0; }
# slurmctld + slurmd first (scontrol shutdown stops both), then slurmdbd, mariadb, munged.
if [ -f "$STATE/slurmctld.pid" ] || [ -f "$STATE/slurmd.pid" ]; then
  timeout 20 scontrol shutdown >/dev/null 2>&1 || true
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  f=$STATE/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  echo "[slurm-teardown] stopped $name (pid $pid)"
  rm -f "$f"
done
