#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1 for the reliability tests (docs/RELIABILITY.md).
#
#   sudo tests/slurm/setup.sh          # install (Debian slurm-wlm + munge), configure, start; idempotent
#   tests/slurm/teardown.sh            # stop every daemon this script started (by pid)
#
# Accounting: GREG_SLURM_ACCOUNTING=slurmdbd (default: MariaDB + slurmdbd, so `sacct` works) or none
# (jobs are then recorded by jobcomp/filetxt only). If slurmdbd cannot be brought up, the script falls back
# to none and says why. jobcomp/filetxt is on in both cases: one line per finished job in $JOBCOMP.
# Exit codes: 0 cluster up, 77 skipped (not root / no apt-get / no Debian packages), 1 failure.
# Every wait is bounded; nothing here can hang CI.
set -uo pipefail

ACCOUNTING=${GREG_SLURM_ACCOUNTING:-slurmdbd}
STATE=/run/greg-slurm             # pids of what we started, read by teardown.sh
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
JOBCOMP=$LOGDIR/jobcomp.txt
CLUSTER=greg
PARTITION=debug
DB_PASS=greg-slurm-local          # local socket only, this throw-away database

log() { echo "[slurm-setup] $*"; }
skip() { echo "[slurm-setup] SKIP: $*"; exit 77; }
die() { echo "[slurm-setup] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || skip "must run as root (uid $(id -u)): it installs packages and starts daemons"
command -v apt-get >/dev/null || skip "apt-get not found: only Debian/Ubuntu's slurm-wlm is supported"

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every second until it succeeds
wait_for() {
  local t=$1 what=$2; shift 2
  for _ in $(seq "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  log "timed out after ${t}s waiting for $what"; return 1
}

# -------------------------------------------------------------------------------------------- packages
pkgs=()
command -v slurmctld >/dev/null || pkgs+=(slurm-wlm)
command -v munged >/dev/null || pkgs+=(munge)
if [ "$ACCOUNTING" = slurmdbd ]; then
  command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
  command -v mariadbd >/dev/null || command -v mysqld >/dev/null || pkgs+=(mariadb-server)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >/dev/null || skip "apt-get update failed (no package mirror reachable?)"
  timeout 600 apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null \
    || skip "apt-get install ${pkgs[*]} failed"
fi
mkdir -p "$STATE" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd /etc/slurm
cp "$CONF" "$STATE/slurm.conf.before" 2>/dev/null || : > "$STATE/slurm.conf.before"

# ----------------------------------------------------------------------------------------------- munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  # munged refuses to run as root; the Debian package's user is munge
  timeout 20 runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  wait_for 10 munge sh -c 'munge -n | unmunge' || die "munge -n | unmunge fails"
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -x munged -n > "$STATE/munged.pid"
  log "munged started (pid $(cat "$STATE/munged.pid"))"
fi

# ---------------------------------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 2048 ))
[ "$MEM" -ge 1024 ] || MEM=1024
write_conf() {  # write_conf ACCOUNTING_LINES -> $CONF.new
cat > "$CONF.new" <<CONF
# Written by tests/slurm/setup.sh: one node, 127.0.0.1, for the reliability tests.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
$1
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

# ---------------------------------------------------------------------------------------- accounting
start_slurmdbd() {
  local sock=/run/mysqld/mysqld.sock
  if ! mysqladmin --socket=$sock ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || timeout 120 mariadb-install-db --user=mysql >/dev/null 2>&1
    # no systemd in containers: start the server directly, in the background
    (setsid mariadbd --user=mysql --socket=$sock --skip-networking --pid-file=/run/mysqld/mysqld.pid \
      >"$LOGDIR/mariadb.log" 2>&1 &)
    wait_for 60 mariadb mysqladmin --socket=$sock ping || return 1
    cp /run/mysqld/mysqld.pid "$STATE/mariadbd.pid"
    log "mariadbd started (pid $(cat "$STATE/mariadbd.pid"))"
  fi
  mariadb --socket=$sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || return 1
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf
  if ! pgrep -x slurmdbd >/dev/null; then
    timeout 30 slurmdbd || return 1
    wait_for 10 "slurmdbd pid file" test -s /run/slurmdbd.pid
    cp /run/slurmdbd.pid "$STATE/slurmdbd.pid"
    wait_for 30 slurmdbd sh -c "sacctmgr -n show cluster >/dev/null" || return 1
    log "slurmdbd started (pid $(cat "$STATE/slurmdbd.pid"))"
  fi
  # the cluster must exist in the database before slurmctld reports to it
  sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

DBD_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5"
if [ "$ACCOUNTING" = slurmdbd ]; then
  # sacctmgr finds slurmdbd through slurm.conf: write it first
  write_conf "$DBD_LINES" && cp "$CONF.new" "$CONF"
  if start_slurmdbd; then
    ACCT_LINES=$DBD_LINES
  else
    log "slurmdbd could not be started (see $LOGDIR/mariadb.log, $LOGDIR/slurmdbd.log): falling back to" \
        "accounting_storage/none; finished jobs are still recorded in $JOBCOMP"
    ACCOUNTING=none
  fi
fi
if [ "$ACCOUNTING" != slurmdbd ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
echo "$ACCOUNTING" > "$STATE/accounting"
write_conf "$ACCT_LINES"

changed=1
cmp -s "$CONF.new" "$STATE/slurm.conf.before" && changed=0
mv "$CONF.new" "$CONF"

if scontrol ping 2>/dev/null | grep -q UP; then
  if [ $changed = 1 ]; then
    log "slurm.conf changed: scontrol reconfigure"
    timeout 30 scontrol reconfigure || die "scontrol reconfigure failed"
  else
    log "slurmctld already up with this slurm.conf"
  fi
else
  timeout 30 slurmctld || die "slurmctld did not start (see $LOGDIR/slurmctld.log)"
  wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP' || die "slurmctld does not answer"
  cp /run/slurmctld.pid "$STATE/slurmctld.pid"
  log "slurmctld started (pid $(cat "$STATE/slurmctld.pid"))"
fi
if ! pgrep -x slurmd >/dev/null; then
  timeout 30 slurmd || die "slurmd did not start (see $LOGDIR/slurmd.log)"
  wait_for 10 "slurmd pid file" test -s /run/slurmd.pid
  cp /run/slurmd.pid "$STATE/slurmd.pid"
  log "slurmd started (pid $(cat "$STATE/slurmd.pid"))"
fi
wait_for 60 "node $HOST idle" sh -c "sinfo -h -n $HOST -o %t | grep -qE '^(idle|mix|alloc)'" \
  || die "node $HOST is not idle: $(sinfo -h -N -o '%N %t %E')"
sinfo
log "cluster '$CLUSTER' up: partition $PARTITION, node $HOST ($CPUS CPUs, $MEM MiB), accounting=$ACCOUNTING"
