"""nemo-run executors and the task they run: the job module under torchrun, with recipe + overrides only.

One process per GPU is started by torchrun (nemo-run's `Torchrun` launcher), never by srun tasks:
under SLURM nemo-run turns `ntasks_per_node=N` into one task per node running `torchrun
--nproc-per-node N --nnodes <nodes>` with a c10d rendezvous on the head node. Containers on SLURM
go through pyxis (`--container-image/--container-mounts`). The code is shipped with nemo-run's
GitArchivePackager when the launch happens inside a git checkout (the job then runs the submitted
commit from `/nemo_run/code`); elsewhere nothing is packaged and the image's installed package runs.

Left out on purpose: nemo-run's Experiment management (one task per launch is all the recipes need)
and its Ray/Lepton/Skypilot executors.
"""

from __future__ import annotations

import argparse
import subprocess
import warnings
from pathlib import Path
from typing import Any

from megatron_speed.recipes.papers import DATA_DIR_ENV, MODEL_DIR_ENV

JOB_MODULE = "megatron_speed.launch.job"
FORWARDED_ENV = (DATA_DIR_ENV, MODEL_DIR_ENV)  # the paper recipes resolve their paths from these


def job_task(recipe: str, overrides: list[str], env: dict[str, str]) -> Any:
    """The nemo-run Script: `python -m megatron_speed.launch.job RECIPE overrides...`."""
    import nemo_run as run

    return run.Script(path=JOB_MODULE, args=[recipe, *overrides], entrypoint="python", m=True, env=env)


def _packager(source_dir: Path) -> Any:
    import nemo_run as run

    inside_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=source_dir,
                                capture_output=True, text=True).stdout.strip() == "true"
    return run.GitArchivePackager() if inside_git else run.Packager()


def local_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=args.nproc, launcher=run.Torchrun(rdzv_port=args.rdzv_port),
                             env_vars=env)


def docker_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    import nemo_run as run

    return run.DockerExecutor(container_image=args.container_image, ntasks_per_node=args.nproc,
                              num_gpus=args.gpus_per_node if args.gpus_per_node is not None else -1,
                              runtime="nvidia", ipc_mode="host", shm_size="16g", volumes=list(args.mounts),
                              env_vars=env, packager=_packager(Path.cwd()),
                              launcher=run.Torchrun(rdzv_port=args.rdzv_port))


def slurm_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    import nemo_run as run

    gpus = args.gpus_per_node if args.gpus_per_node is not None else args.nproc
    return run.SlurmExecutor(account=args.account, partition=args.partition, time=args.time, nodes=args.nodes,
                             ntasks_per_node=args.nproc, gpus_per_node=gpus, container_image=args.container_image,
                             container_mounts=list(args.mounts), env_vars=env, packager=_packager(Path.cwd()),
                             launcher=run.Torchrun(rdzv_port=args.rdzv_port))


EXECUTORS = {"local": local_executor, "docker": docker_executor, "slurm": slurm_executor}


def submit(recipe: str, overrides: list[str], args: argparse.Namespace, env: dict[str, str]) -> int:
    """Run (or with `args.dryrun`, print) the job; the exit status is the job's for local and Docker
    runs, which block, and 0 once a SLURM job is queued (it outlives the submitting shell)."""
    warnings.filterwarnings("ignore", message=".*starlette")  # leptonai imports deprecated starlette parts
    import nemo_run as run

    executor = EXECUTORS[args.executor](args, env)
    name = args.name or recipe.replace(".", "_")
    with run.Experiment(name, executor=executor) as exp:
        exp.add(job_task(recipe, overrides, env), name=name, tail_logs=args.executor != "slurm")
        if args.dryrun:
            exp.dryrun()
            return 0
        detach = args.executor == "slurm"
        exp.run(detach=detach)
    if detach:
        return 0
    # Read after the context closes: leaving it is what waits for an attached job to finish.
    status = (exp.status(return_dict=True) or {}).get(name, {}).get("status")
    return 0 if str(status) == "SUCCEEDED" else 1
