#!/bin/sh
# Install Debian's slurm-wlm and munge for tests/slurm (a private one-host cluster) when they are
# missing. Needs root and apt-get; without them it says so and succeeds, and those tests then skip
# with the same reason. Part of the README's test command, so `.ci/run` runs it too.
if command -v sbatch >/dev/null 2>&1 && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/slurm/install.sh: slurm-wlm and munge are missing and need root + apt-get to install; the SLURM tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
