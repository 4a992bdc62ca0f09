"""Run one workflow job's command: keep every attempt's log, never retry a bad config or a NaN.

    python job.py --log LOG --attempt N -- greg train ...

Snakemake deletes a job's declared log before each attempt and retries every failure alike. This wrapper
(standard library only: it runs in any job environment, venv or conda)

* writes the command's stdout+stderr to LOG (the declared log, this attempt) and appends it, after a header
  line naming the attempt, host and SLURM job, to LOG's sibling ``<stem>.attempts.log`` (never truncated);
* turns the CLIs' "retrying cannot help" exits (2 bad input/config, 3 NaN/inf) into a marker
  ``<log>.noretry``, but only when the command's last output line is greg's own one-line error (``greg
  <command>: ...``): a 2 or 3 from anything else (a math library that failed to load under memory pressure,
  the interpreter) is an environment failure that a retry may cure. A retry (attempt > 1) that finds the
  marker exits at once with the same code, without running anything (Snakemake has no per-exit-code retry
  policy, so the retry is still submitted, but it costs seconds, not a GPU for hours). Attempt 1 (a new ``snakemake`` invocation, e.g. after fixing the
  config) removes the marker and runs;
* forwards SIGTERM / SIGUSR1 / SIGINT / SIGHUP to the command, whose CLI checkpoints and exits on them
  (SLURM's ``--signal=USR1@300`` reaches this process as well as the command; without the handler it would
  kill this wrapper and leave the command orphaned).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

NO_RETRY = {2: "bad input or config", 3: "the loss or the weights became NaN/inf"}
KILLED = 128 + int(signal.SIGKILL)  # 137
# SIGKILL leaves the command no time to print anything: say what sends it
KILLED_HINT = (
    "job.py: exit 137, killed by SIGKILL: most likely the kernel's out-of-memory killer or the scheduler's memory "
    "limit (on SLURM: sacct -j {slurm} -o JobID,State,MaxRSS,ReqMem). Training resumes from its last state.pt; "
    "give the rule more mem_mb (docs/WORKFLOW.md, 'Rehearsal', lists the measured peaks)\n"
)
#: How every greg CLI error line starts ("greg train: ...", argparse's "greg train: error: ...").
GREG_ERROR_PREFIX = "greg "
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
#: Set only by the rehearsal (workflow/rules/rehearsal.smk): the command then runs under rehearse.py, which
#: records its peak RSS and seconds per step there and preempts + resumes each training once.
REHEARSAL_ENV = "GREG_REHEARSAL_DIR"


def attempts_log(log: Path) -> Path:
    return log.with_name(f"{log.stem}.attempts{log.suffix or '.log'}")


def marker(log: Path) -> Path:
    return log.with_name(f"{log.name}.noretry")


def from_greg(output: str) -> bool:
    """Whether ``output``'s last non-blank line is a greg CLI's own error line."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return bool(lines) and lines[-1].startswith(GREG_ERROR_PREFIX)


def header(attempt: int, cmd: list[str]) -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    slurm = os.environ.get("SLURM_JOB_ID")
    where = socket.gethostname() + (f", SLURM job {slurm}" if slurm else "")
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if restarts:
        where += f", requeue {restarts}"
    return f"=== attempt {attempt} at {now} on {where}: {' '.join(cmd)}\n"


def run(log: Path, attempt: int, cmd: list[str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    mark = marker(log)
    with open(log, "w", encoding="utf-8") as out, open(attempts_log(log), "a", encoding="utf-8") as hist:

        def write(text: str) -> None:
            for f in (out, hist):
                f.write(text)
                f.flush()

        write(header(attempt, cmd))
        if attempt > 1 and mark.exists():
            code = int((mark.read_text().strip() or "2").split()[0])
            write(f"job.py: not retrying: attempt 1 exited {code} ({NO_RETRY.get(code, 'fatal')}); "
                  f"fix it and rerun snakemake (the marker {mark} is removed then)\n")
            return code
        mark.unlink(missing_ok=True)  # our own marker of an earlier snakemake invocation
        if os.environ.get(REHEARSAL_ENV):
            cmd = [sys.executable, str(Path(__file__).with_name("rehearse.py")), "--", *cmd]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as e:
            write(f"job.py: cannot run {cmd[0]}: {e}\n")
            return 127
        old = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in FORWARDED}
        try:
            assert proc.stdout is not None
            tail = ""
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                text = chunk.decode("utf-8", errors="replace")
                write(text)
                tail = (tail + text)[-4096:]
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
        if code == KILLED:
            write(KILLED_HINT.format(slurm=os.environ.get("SLURM_JOB_ID", "<jobid>")))
        if code in NO_RETRY and not from_greg(tail):
            write(f"job.py: exit {code} without a greg error line: an environment failure, a retry may run\n")
        elif code in NO_RETRY:
            mark.write_text(f"{code}\n", encoding="utf-8")
            write(f"job.py: exit {code} ({NO_RETRY[code]}): a retry of this job will not run it again\n")
        return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True, type=Path, help="the job's declared log file")
    p.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number (1 = first)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (job.py --log LOG -- COMMAND ...)")
    return run(args.log, args.attempt, cmd)


if __name__ == "__main__":
    sys.exit(main())
