#!/usr/bin/env bash
# Starts a single-node SLURM (munged, slurmctld, slurmd) for the tests, as root, without systemd or
# cgroups. It writes /etc/slurm/slurm.conf and gres.conf (the default path: sbatch, and srun inside
# a job, find it without SLURM_CONF; an existing slurm.conf not written by this script is left alone
# and the script stops). State, logs and the PIDs of the daemons it started live under
# $HNCT_SLURM_DIR (default /tmp/hnct-slurm); tests/slurm/stop.sh stops exactly those PIDs.
#
# The node has one fake GPU (gres File=/dev/null) so `--gpus=1` jobs are scheduled as on a GPU
# node. Without cgroups, CPU/memory/GPU limits are bookkeeping only; time limits are enforced.
# The node is declared with HNCT_SLURM_CPUS (8) CPUs and HNCT_SLURM_MEM_MB (64000) MB whatever
# the machine has (SlurmdParameters=config_overrides), so the profile's cluster-sized requests
# schedule unchanged. No slurmdbd: MinJobAge=3600 keeps finished jobs in slurmctld, so squeue and
# `scontrol show job` answer for an hour (the profile is run with --slurm-status-command squeue).
set -euo pipefail
dir=${HNCT_SLURM_DIR:-/tmp/hnct-slurm}
cpus=${HNCT_SLURM_CPUS:-8}
mem_mb=${HNCT_SLURM_MEM_MB:-64000}
node=$(hostname -s)
conf=/etc/slurm/slurm.conf
marker="# Single-node test cluster written by tests/slurm/start.sh (hnct)."
pids=$dir/pids

if [ "$(id -u)" -ne 0 ]; then
  echo "start.sh: run as root (the daemons need it)" >&2
  exit 1
fi
command -v slurmctld >/dev/null || { echo "start.sh: run tests/slurm/install.sh first" >&2; exit 1; }

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

wait_idle() {
  local deadline=$((SECONDS + ${1:-60})) state
  while [ $SECONDS -lt $deadline ]; do
    while read -r name pid; do
      if ! alive "$pid"; then
        echo "start.sh: $name ($pid) exited; its log:" >&2
        tail -n 5 "$dir/log/$name.out" >&2 || true
        return 1
      fi
    done <"$pids"
    state=$(sinfo --noheader --nodes="$node" --format=%T 2>/dev/null | head -n1 || true)
    case "$state" in
      idle | mixed | allocated) return 0 ;;
      # A drain recorded by an earlier run survives restarts (StateSaveLocation): resume it.
      drain* | down* | draining | drained) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "start.sh: node $node not idle after ${1:-60}s (state: ${state:-none}); logs in $dir/log" >&2
  sinfo -R >&2 || true
  return 1
}

# Already started by an earlier call: reuse the daemons it recorded.
if [ -f "$pids" ]; then
  all_alive=1
  while read -r _name pid; do alive "$pid" || all_alive=0; done <"$pids"
  if [ "$all_alive" = 1 ] && wait_idle 20; then
    echo "slurm: running (reused)"
    exit 0
  fi
  bash "$(dirname "$0")/stop.sh"
fi

if [ -f "$conf" ] && ! head -n1 "$conf" | grep -qF "$marker"; then
  echo "start.sh: $conf exists and was not written by this script; not touching it" >&2
  exit 1
fi
mkdir -p /etc/slurm "$dir/state" "$dir/spool" "$dir/log"
: >"$pids"

cat >"$conf" <<CONF
$marker
ClusterName=hnct
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Without it a job that asks for no memory takes the whole node.
DefMemPerCPU=1000
# Finished jobs stay visible to squeue/scontrol for an hour (>= 3x the plugin's first status wait).
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
# A count-only gres line drains the node with 0 GPUs: name a file.
cat >/etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=$node Name=gpu File=/dev/null
CONF

start() { # name, command...: start in the foreground of a new session, record the PID.
  local name=$1
  shift
  setsid "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
  echo "$name $!" >>"$pids"
}

if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
start slurmctld slurmctld -D -f "$conf"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
start slurmd slurmd -D -f "$conf"
wait_idle 60
echo "slurm: node $node idle ($(sed -n 's/^\([a-z]*\) \([0-9]*\)$/\1=\2/p' "$pids" | tr '\n' ' '))"
