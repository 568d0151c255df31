#!/usr/bin/env bash
# Installs a single-node SLURM from Debian's packages (slurm-wlm 22.05 on Debian 12) and munge.
# No accounting daemon: the test cluster answers job states through squeue (see docs/cluster.md).
# Idempotent: does nothing when everything is already installed. Needs root (CI runs as root).
set -euo pipefail
packages=(slurm-wlm munge)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm: already installed ($(dpkg-query -W -f='${Version}' slurm-wlm))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm: installing ${missing[*]} needs root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Package scripts must not start daemons (there is no init system here): start.sh starts them.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "slurm: installed $(dpkg-query -W -f='${Version}' slurm-wlm)"
