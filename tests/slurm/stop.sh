#!/usr/bin/env bash
# Stops the daemons tests/slurm/start.sh started, by the PIDs it recorded (never by name), and removes
# the /etc/slurm/slurm.conf and gres.conf it wrote: with a slurm.conf naming a controller that is
# gone, every SLURM client call (the executor plugin runs `scontrol show config` whenever Snakemake
# starts, even for local runs) waits ~10 s for it.
set -euo pipefail
dir=${HNCT_SLURM_DIR:-/tmp/hnct-slurm}
pids=$dir/pids
marker="# Single-node test cluster written by tests/slurm/start.sh (hnct)."
if [ -f "$pids" ]; then
  # slurmd first, munged last (the others authenticate through it).
  mapfile -t lines < <(tac "$pids")
  for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    # Only a PID that still runs the program we started (PIDs get reused).
    if kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
      echo "stopped $name ($pid)"
    fi
  done
  rm -f "$pids"
fi
if [ -f /etc/slurm/slurm.conf ] && head -n1 /etc/slurm/slurm.conf | grep -qF "$marker"; then
  rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
fi
