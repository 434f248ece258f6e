"""nemo-run executors and the task they run: the job module under torchrun, with recipe + overrides only.

One process per GPU is started by torchrun (nemo-run's `Torchrun` launcher), never by srun tasks:
under SLURM nemo-run turns `ntasks_per_node=N` into one task per node running `torchrun
--nproc-per-node N --nnodes <nodes>` with a c10d rendezvous on the head node. Containers on SLURM
go through pyxis (`--container-image/--container-mounts`). The code is shipped with nemo-run's
GitArchivePackager when megatron_speed is imported from a git checkout (the job then runs that
checkout's HEAD from `/nemo_run/code`); an installed package ships nothing and the image's copy runs.

Left out on purpose: nemo-run's Experiment management (one task per launch is all the recipes need)
and its Ray/Lepton/Skypilot executors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from megatron_speed.recipes.papers import DATA_DIR_ENV, MODEL_DIR_ENV

JOB_MODULE = "megatron_speed.launch.job"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout's root when run from one
FORWARDED_ENV = (DATA_DIR_ENV, MODEL_DIR_ENV)  # the paper recipes resolve their paths from these


def job_task(recipe: str, overrides: list[str], env: dict[str, str]) -> Any:
    """The nemo-run Script: `python -m megatron_speed.launch.job RECIPE overrides...`."""
    import nemo_run as run

    return run.Script(path=JOB_MODULE, args=[recipe, *overrides], entrypoint="python", m=True, env=env)


def _is_checkout() -> bool:
    return (SOURCE_ROOT / "launch.py").exists() and subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=SOURCE_ROOT, capture_output=True, text=True,
    ).stdout.strip() == "true"


def _packager() -> Any:
    """Ship this checkout's HEAD; an installed package ships nothing (the image's copy runs)."""
    import nemo_run as run

    return run.GitArchivePackager(basepath=str(SOURCE_ROOT)) if _is_checkout() else run.Packager()


def local_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    """Runs `torchrun` on this machine; the interpreter's own bin/ goes first on PATH, so a venv's
    torchrun is found even when the venv is not activated (`/path/to/venv/bin/python launch.py ...`)."""
    import nemo_run as run

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return run.LocalExecutor(ntasks_per_node=args.nproc, launcher=run.Torchrun(rdzv_port=args.rdzv_port),
                             env_vars={**env, "PATH": path})


def docker_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    import nemo_run as run

    return run.DockerExecutor(container_image=args.container_image, ntasks_per_node=args.nproc,
                              num_gpus=args.gpus_per_node if args.gpus_per_node is not None else -1,
                              runtime="nvidia", ipc_mode="host", shm_size="16g", volumes=list(args.mounts),
                              env_vars=env, packager=_packager(),
                              launcher=run.Torchrun(rdzv_port=args.rdzv_port))


def slurm_executor(args: argparse.Namespace, env: dict[str, str]) -> Any:
    """sbatch through a local tunnel (`sbatch`, `scontrol` on this machine's PATH). Jobs are submitted
    with `--requeue` (nemo-run's default): a preempted or `scontrol requeue`d job reruns its script and
    resumes from its latest checkpoint. Without a container the job runs this interpreter's environment
    (its bin/ first on PATH), which must therefore be on a filesystem the nodes share."""
    import nemo_run as run

    gpus = args.gpus_per_node if args.gpus_per_node is not None else args.nproc
    if args.container_image is None:
        env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}$PATH"}  # expanded by the batch script
    executor = run.SlurmExecutor(account=args.account, partition=args.partition, time=args.time, nodes=args.nodes,
                                 ntasks_per_node=args.nproc, gpus_per_node=gpus or None,
                                 container_image=args.container_image, container_mounts=list(args.mounts),
                                 env_vars=env, packager=_packager(), signal=args.signal,
                                 launcher=run.Torchrun(rdzv_port=args.rdzv_port), poll_estimated_start_time=False)
    executor.retries = args.retries  # the batch script requeues itself after an unfinished exit, up to N times
    return executor


EXECUTORS = {"local": local_executor, "docker": docker_executor, "slurm": slurm_executor}


def submit(recipe: str, overrides: list[str], args: argparse.Namespace, env: dict[str, str]) -> int:
    """Run (or with `args.dryrun`, print) the job; the exit status is the job's for local and Docker
    runs, which block. A SLURM job outlives the submitting shell: its id and log are printed and the
    status is 0 once it is queued, or with `args.wait` the job's own (see `slurm.report`)."""
    warnings.filterwarnings("ignore", message=".*starlette")  # leptonai imports deprecated starlette parts
    import nemo_run as run

    executor = EXECUTORS[args.executor](args, env)
    name = args.name or recipe.replace(".", "_")
    # nemo-run's SLURM packaging asks git for the top level of the *current* directory, so package
    # from the checkout whatever directory launch.py was started in (local jobs keep the caller's).
    packaged = args.executor != "local" and _is_checkout()
    where = contextlib.chdir(SOURCE_ROOT) if packaged else contextlib.nullcontext()
    with where, run.Experiment(name, executor=executor) as exp:
        exp.add(job_task(recipe, overrides, env), name=name, tail_logs=args.executor != "slurm")
        if args.dryrun:
            exp.dryrun()
            return 0
        detach = args.executor == "slurm"
        exp.run(detach=detach)
    if detach:
        from megatron_speed.launch.slurm import report, submitted

        return report(submitted(exp.jobs[0]), wait_for_end=args.wait)
    # Read after the context closes: leaving it is what waits for an attached job to finish.
    status = (exp.status(return_dict=True) or {}).get(name, {}).get("status")
    return 0 if str(status) == "SUCCEEDED" else 1
