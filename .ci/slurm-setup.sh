#!/usr/bin/env bash
# Install Slurm (controller, node daemon, client commands) and MUNGE from Debian's packages,
# for tests/test_slurm.py, which starts its own throw-away single-node cluster on localhost.
#
# Idempotent: exits 0 at once when the commands are already there. Starts no daemon.
# Exit codes: 0 installed (or already present); 3 cannot install here (not root, or no
# apt-get); 4 apt-get failed (no network, unknown packages, ...). The test skips on 3 and 4.
set -uo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
NEEDED=(slurmctld slurmd sbatch srun scontrol squeue scancel sinfo munged)
PACKAGES=(slurmctld slurmd slurm-client munge)

missing=()
for cmd in "${NEEDED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "slurm-setup: Slurm and MUNGE already installed ($(slurmctld -V 2>/dev/null || echo '?'))"
    exit 0
fi
echo "slurm-setup: missing ${missing[*]}"
if [ "$(id -u)" != "0" ]; then
    echo "slurm-setup: cannot install ${PACKAGES[*]}: not root" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-setup: cannot install ${PACKAGES[*]}: no apt-get (not a Debian/Ubuntu system)" >&2
    exit 3
fi

# Keep the packages' maintainer scripts from starting system-wide daemons (munge, slurmd,
# slurmctld): the test runs its own, with its own ports, key and state folder.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod 755 "$POLICY" && created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
install() {
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}
if ! install; then
    echo "slurm-setup: apt-get install failed; running apt-get update and trying again"
    if ! { apt-get update -q && install; }; then
        echo "slurm-setup: apt-get could not install ${PACKAGES[*]}" >&2
        exit 4
    fi
fi
for cmd in "${NEEDED[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "slurm-setup: $cmd still missing after installing ${PACKAGES[*]}" >&2
        exit 4
    fi
done
echo "slurm-setup: installed $(slurmctld -V)"
