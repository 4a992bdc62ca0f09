"""Rehearsal wrapper of one workflow job: measure it, and preempt + resume every training once.

    python rehearse.py --jobs DIR -- greg train ... --out RUN_DIR ...

job.py runs its command under this script when ``$GREG_REHEARSAL_DIR`` is set (only the rehearsal sets it,
workflow/rules/rehearsal.smk; otherwise nothing here runs). For a ``greg train`` command, as soon as the run
writes its first resume checkpoint (``RUN_DIR/state.pt``) it receives SIGTERM, as a SLURM preemption would
send; the trainer checkpoints and exits, and the same command is run again, which must resume and finish. Every
job then writes ``DIR/<job>.json``: wall and CPU seconds (user + system: less sensitive than wall time to other
load on the machine), the command's peak RSS (the largest of its processes, from
``wait4``; data-loader worker processes are separate processes) and its peak resident + swapped memory
(sampled; what a job larger than RAM needs on a machine with swap), and for training the optimizer steps and the
median seconds per step (from the run's ``metrics.jsonl``; the first step of each session, which includes
start-up, is left out) with the batch sizes of its config. Standard library only (it runs in any job env).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.5


def _arg(cmd: list[str], flag: str) -> str | None:
    for i, a in enumerate(cmd[:-1]):
        if a == flag:
            return cmd[i + 1]
    return None


def kind_of(cmd: list[str]) -> str:
    """``train`` / ``evaluate`` / ``report`` ... : the greg subcommand (else the program's name)."""
    if cmd and Path(cmd[0]).name == "greg" and len(cmd) > 1:
        return cmd[1]
    return Path(cmd[0]).name if cmd else "?"


def resident_plus_swap_mb(pid: int) -> float:
    """VmRSS + VmSwap of ``pid`` in MB (0 where /proc is not readable): on a machine with swap the peak RSS
    of a job larger than RAM stops at RAM, while what it needs is both."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0.0
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(VmRSS|VmSwap):\s+(\d+) kB", text, re.M)}
    return (kib.get("VmRSS", 0) + kib.get("VmSwap", 0)) / 1024.0


def run_once(cmd: list[str], interrupt: Path | None) -> tuple[int, float, float, bool, float]:
    """Run ``cmd``; return (exit code, peak RSS in MB, CPU seconds (user + system), whether it was sent
    SIGTERM, peak resident + swapped MB sampled every :data:`POLL_S`). With ``interrupt``, the command gets
    SIGTERM once that file appears (or changes) after the start."""
    before = interrupt.stat().st_mtime_ns if interrupt is not None and interrupt.exists() else None
    proc = subprocess.Popen(cmd)
    old = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in FORWARDED}
    sent = False
    mem = 0.0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            mem = max(mem, resident_plus_swap_mb(proc.pid))
            if (
                interrupt is not None and not sent and interrupt.exists()
                and interrupt.stat().st_mtime_ns != before
            ):
                proc.send_signal(signal.SIGTERM)
                sent = True
            time.sleep(POLL_S)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    proc.returncode = os.waitstatus_to_exitcode(status)
    code = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
    rss = usage.ru_maxrss / 1024.0  # ru_maxrss: KiB on Linux
    return code, rss, usage.ru_utime + usage.ru_stime, sent, max(mem, rss)


def step_times(metrics: Path) -> tuple[int, float | None]:
    """(steps logged, median seconds per step) from a run's ``metrics.jsonl``. ``time`` counts from the start
    of each session's loop, so consecutive records of one session give a step's time; the first record of a
    session (start-up, first batch) is not a step time."""
    if not metrics.is_file():
        return 0, None
    recs = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r and "time" in r:
            recs.append((int(r["step"]), float(r["time"])))
    diffs = [
        (t1 - t0) / (s1 - s0)
        for (s0, t0), (s1, t1) in itertools.pairwise(recs)
        if s1 > s0 and t1 > t0  # same session (time restarts at 0 after a resume)
    ]
    return len({s for s, _ in recs}), (statistics.median(diffs) if diffs else None)


def batch_sizes(run_dir: Path) -> dict[str, int | None]:
    """``data.batch_size`` / ``data.aux_batch_size`` of the run's ``config.yaml`` (read without a YAML
    library: the two keys are plain scalars under ``data:``)."""
    out: dict[str, int | None] = {"batch_size": None, "aux_batch_size": None}
    f = run_dir / "config.yaml"
    if not f.is_file():
        return out
    in_data = False
    for line in f.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\S", line):
            in_data = line.startswith("data:")
            continue
        m = re.match(r"^\s+(batch_size|aux_batch_size):\s*(\S+)", line)
        if in_data and m:
            out[m.group(1)] = int(m.group(2)) if m.group(2).isdigit() else None
    return out


def job_name(cmd: list[str]) -> str:
    out = _arg(cmd, "--out") or "job"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind_of(cmd)}__{out}").strip("_")


FIELDS = ["job", "kind", "exit", "wall_s", "cpu_s", "peak_rss_mb", "peak_mem_mb", "steps", "s_per_step", "batch_size",
          "aux_batch_size", "preempted_and_resumed"]


def summarize(jobs: Path) -> str:
    """The CSV of every ``<job>.json`` under ``jobs`` (sorted by job), columns :data:`FIELDS`."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for f in sorted(jobs.glob("*.json")) if jobs.is_dir() else []:
        rec = json.loads(f.read_text(encoding="utf-8"))
        w.writerow({k: "" if rec.get(k) is None else rec[k] for k in FIELDS})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=Path, default=None, help="where to write <job>.json (default: $GREG_REHEARSAL_DIR)")
    p.add_argument("--summarize", type=Path, metavar="CSV", help="write the CSV of --jobs DIR's records and exit")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    if args.summarize:
        if args.jobs is None:
            p.error("--summarize needs --jobs DIR")
        tmp = args.summarize.with_name(f".{args.summarize.name}.{os.getpid()}.tmp")
        args.summarize.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(summarize(args.jobs), encoding="utf-8")
        os.replace(tmp, args.summarize)
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    jobs = args.jobs or Path(os.environ.get("GREG_REHEARSAL_DIR", "rehearsal-jobs"))
    if not cmd:
        p.error("no command given (rehearse.py -- COMMAND ...)")
    kind = kind_of(cmd)
    out = _arg(cmd, "--out")
    run_dir = Path(out) if kind == "train" and out else None
    t0 = time.monotonic()
    interrupt = run_dir / "state.pt" if run_dir is not None and not (run_dir / "final.pt").exists() else None
    code, rss, cpu, sent, mem = run_once(cmd, interrupt)
    resumed = False
    if sent and code != 0:
        print(f"rehearse: preempted with SIGTERM after the first checkpoint (exit {code}); resuming", flush=True)
        code, rss2, cpu2, _, mem2 = run_once(cmd, None)
        rss, cpu, mem, resumed = max(rss, rss2), cpu + cpu2, max(mem, mem2), True
    record = {"job": job_name(cmd), "kind": kind, "exit": code, "wall_s": round(time.monotonic() - t0, 3),
              "cpu_s": round(cpu, 3), "peak_rss_mb": round(rss, 1), "peak_mem_mb": round(mem, 1),
              "preempted_and_resumed": resumed,
              "steps": None, "s_per_step": None, "batch_size": None, "aux_batch_size": None, "cmd": cmd}
    if run_dir is not None:
        steps, sps = step_times(run_dir / "metrics.jsonl")
        record |= {"steps": steps, "s_per_step": None if sps is None else round(sps, 4), **batch_sizes(run_dir)}
    jobs.mkdir(parents=True, exist_ok=True)
    tmp = jobs / f".{record['job']}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, jobs / f"{record['job']}.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
