"""tools/gpu_check.sh: its plan (what a GPU host would run) and the stage report, checked on CPU.

The plan must name commands that exist here, keep each stage's timeouts under the 5 minutes it is sized
for, mark the pytest runs `-m gpu`, put every output under the folder given, and call the kernel
benchmark at sizes its own parser accepts and the ahead-of-time compile test covers. The wheels it
installs must bring pytest (the image has none) with its requirements, and what it runs must import
without matplotlib (the image has none either). The report runs on a stage folder made here by the
stage's real kernel-test command (its tests skip without CUDA).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
LINE = re.compile(r"stage (\d): (\w+) \(timeout (\d+)s\): (.*)")

sys.path.insert(0, str(ROOT / "tools"))
import bench_js_kernel  # noqa: E402


def planned(out: Path, *args: str) -> list[tuple[int, str, int, list[str]]]:
    done = subprocess.run(["bash", str(SCRIPT), "--plan", *args, str(out)], capture_output=True, text=True,
                          check=True)
    return [(int(m[1]), m[2], int(m[3]), shlex.split(m[4])) for m in map(LINE.fullmatch, done.stdout.splitlines())
            if m]


def test_the_plan_fits_each_stage_in_five_minutes_and_names_real_files(tmp_path: Path) -> None:
    commands = planned(tmp_path / "out")
    assert {stage for stage, *_ in commands} == {1, 2}
    for stage in (1, 2):
        assert sum(limit for s, _, limit, _ in commands if s == stage) < 300, f"stage {stage} exceeds 5 minutes"
    for _, name, _, argv in commands:
        scripts = [a for a in argv if a.endswith(".py")]
        assert scripts and all((ROOT / s).exists() for s in scripts), (name, scripts)
        if "pytest" in argv:
            assert argv[argv.index("-m", 2) + 1] == "gpu" and (ROOT / scripts[0]).parent.name == "gpu"
        outputs = [a.split("=", 1)[-1] for a in argv if a.startswith("--junitxml=")]
        outputs += [argv[i + 1] for i, a in enumerate(argv) if a in ("--out", "--cache")]
        assert outputs and all(o.startswith(str(tmp_path / "out")) for o in outputs), (name, outputs)
    assert {name for _, name, _, _ in commands} == {"kernel_gpu_tests", "bench_js_kernel", "bench_actor",
                                                    "bench_actor_packing", "engine_gpu_tests", "bench_rollout"}


def test_stage_one_measures_packing_and_tests_the_packed_attention_kernel(tmp_path: Path) -> None:
    commands = {name: (stage, argv) for stage, name, _, argv in planned(tmp_path)}
    stage, argv = commands["bench_actor_packing"]
    assert stage == 1 and argv[argv.index("--lengths") + 1] == "longtail"
    batching = argv[argv.index("--batching") + 1:]
    assert {"fixed", "packed"} <= set(batching[:next((i for i, a in enumerate(batching) if a.startswith("--")),
                                                     len(batching))])
    assert "tests/gpu/test_packed_attention_gpu.py" in commands["kernel_gpu_tests"][1]


def pins() -> dict[str, str]:
    done = subprocess.run(["bash", str(SCRIPT), "--pins"], capture_output=True, text=True, check=True)
    return dict(pin.split("==") for pin in done.stdout.split())


def test_the_staged_pytest_is_the_projects_with_all_it_requires_on_the_gpu_host(tmp_path: Path) -> None:
    """pytest as pyproject pins it, and every requirement pytest declares for CPython 3.12 on Linux, each
    pinned at a version that satisfies it and matched by a stage-1 wheel glob of the plan."""
    staged = pins()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert f"pytest=={staged['pytest']}" in extra
    assert importlib.metadata.version("pytest") == staged["pytest"]  # its metadata is the staged wheel's
    host = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
            "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    needed = [Requirement(r) for r in importlib.metadata.requires("pytest") or []]
    needed = [r for r in needed if r.marker is None or r.marker.evaluate(host)]
    assert needed and {r.name for r in needed} <= set(staged), {r.name for r in needed} - set(staged)
    for r in needed:
        assert r.specifier.contains(staged[r.name]), (r, staged[r.name])
    install = next(line for line in subprocess.run(["bash", str(SCRIPT), "--plan", str(tmp_path)], capture_output=True,
                                                   text=True, check=True).stdout.splitlines()
                   if line.startswith("stage 1: install "))
    for name in staged:
        assert f" {name.replace('-', '_')}-*.whl" in install, name


# Runs in a fresh interpreter: matplotlib made unimportable, then every import statement given (argv).
BLOCKED_IMPORTS = """
import importlib.abc, sys
class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"{name}: not on the GPU host's image")
sys.meta_path.insert(0, NoMatplotlib())
sys.path[:0] = [".", "tools"]
for statement in sys.argv[1:]:
    exec(statement)
try:
    import matplotlib
except ImportError:
    print("BLOCKED")
"""


def entry_point_imports(tmp_path: Path) -> list[str]:
    """The modules the plan runs (GPU test files, benchmark scripts) and every project import in them,
    the ones inside functions included (the benchmarks import the actor and engine lazily)."""
    statements = []
    for _, _, _, argv in planned(tmp_path):
        for script in (a for a in argv if a.endswith(".py") and a.startswith(("tests/", "tools/"))):
            path = ROOT / script
            module = ".".join(Path(script).with_suffix("").parts)
            statements.append(f"import {module.removeprefix('tools.')}")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                        (node.module or "").split(".")[0] in ("megatron_speed", "tests"):
                    statements.append(ast.unparse(node))
    return statements


def test_what_the_stages_run_imports_without_matplotlib(tmp_path: Path) -> None:
    statements = entry_point_imports(tmp_path)
    assert "import tests.gpu.test_engine_gpu" in statements and "import bench_actor" in statements
    assert any("MegatronActor" in s for s in statements) and any("VLLMEngine" in s for s in statements)
    done = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, *statements], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1:] == ["BLOCKED"]  # the blocker was in place the whole time


def test_the_kernel_benchmark_sizes_parse_and_are_compiled_in_ci(tmp_path: Path) -> None:
    argv = next(a for _, name, _, a in planned(tmp_path) if name == "bench_js_kernel")
    args = bench_js_kernel.parse_args(argv[argv.index("tools/bench_js_kernel.py") + 1:])
    defaults = bench_js_kernel.parse_args([])  # the grid tests/unit/test_kernel_compile.py compiles
    assert set(args.rows) <= set(defaults.rows) and set(args.tokens) <= set(defaults.tokens)


def test_one_stage_and_bad_arguments(tmp_path: Path) -> None:
    assert {stage for stage, *_ in planned(tmp_path, "--stage", "2")} == {2}
    for bad in (["--stage", "3", "x"], ["--frobnicate", "x"], []):
        assert subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True).returncode == 2, bad


def test_the_report_of_a_stage_folder(tmp_path: Path) -> None:
    stage = tmp_path / "stage1"
    stage.mkdir()
    _, name, _, argv = next(c for c in planned(tmp_path) if c[1] == "kernel_gpu_tests")
    argv = [sys.executable if a == "python3" else a for a in argv]
    argv = [f"--junitxml={stage / 'kernel_gpu_tests.xml'}" if a.startswith("--junitxml=") else a for a in argv]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    (stage / "commands.tsv").write_text(f"{name}\t{done.returncode}\t3\t{stage / 'x.log'}\n"
                                        f"bench_js_kernel\t2\t1\t{stage / 'y.log'}\n")
    report = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check_report.py"), str(stage), "--stage", "1"],
                            capture_output=True, text=True)
    assert report.returncode == 1  # the benchmark's exit 2 (no CUDA) fails the stage
    summary = json.loads((stage / "summary.json").read_text())
    tests = summary["tests"]["kernel_gpu_tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # no CUDA here: every GPU test skips
    assert [c["status"] for c in summary["commands"]] == ["passed", "failed (exit 2)"]
    assert "| bench_js_kernel | failed (exit 2) | 1 |" in (stage / "summary.md").read_text()
