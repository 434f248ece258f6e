#!/bin/sh
# Install Debian's slurm-wlm and munge for tests/slurm (a private one-host cluster) when they are
# missing. Needs root, apt-get and a reachable package mirror; without them it says why, records the
# reason in $FAILED (read by tests/slurm/conftest.py) and succeeds, and the SLURM tests then skip
# with that reason. Part of the README's test command, so `.ci/run` runs it too.
FAILED="${TMPDIR:-/tmp}/megatron-speed-slurm-install.failed"
if command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
    rm -f "$FAILED"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/slurm/install.sh: slurm-wlm and munge are missing and need root + apt-get to install; the SLURM tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if log=$(apt-get update -qq 2>&1 && apt-get install -y -qq --no-install-recommends slurm-wlm munge 2>&1); then
    rm -f "$FAILED"
else
    echo "apt-get could not install slurm-wlm and munge: $(printf '%s' "$log" | tail -n 3)" | tee "$FAILED"
    echo "tests/slurm/install.sh: the SLURM tests will skip with that reason"
fi
exit 0
