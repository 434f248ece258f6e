"""The James-Stein kernel compiled ahead of time for Hopper (sm_90) and Ampere (sm_80) on a CPU machine.

Triton lowers a kernel for a target with no device present (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` returns PTX, cubin and metadata). Every launch the trainer and the
benchmark make is planned by the kernel's own `plan_launches` on meta tensors (same tiling, same
arguments), specialised by Triton's own binder (pointer alignment, integers divisible by 16 or equal
to 1: what the JIT would see on the GPU), deduplicated, and compiled. Each compiled kernel must have:

* no approximate division (`div.full.f32` / `div.approx`): the per-group and per-row math divides with
  `tl.div_rn`, correctly rounded as in the interpreter and in PyTorch;
* 128-bit global accesses (`v4.b32`, `v2.b64` or `b128`) for the token-tile stores, the mask loads and
  the span (start/length) loads, each found by its source line in the LLVM IR's debug locations;
* no local memory (no spills: cuobjdump `LOCAL:0`, no `.local` in the PTX);
* at most REGISTER_BOUND (64) registers per thread (cuobjdump `REG`): the persistent grid keeps 32
  warps resident per SM at every row width (js_triton._GPU), and 32 warps x 32 threads x 64 registers
  is an SM's register file (65536 on sm_80 and sm_90).

The trainer's row width T is the longest row of each batch (curriculum/batch.py), so it is swept: every
power-of-two boundary of the token block from 1 to 1025, widths that are not multiples of 16, and the
longest row each James-Stein recipe allows, at each recipe's N and G.

The Triton here is 3.9.0 (the CPU set); the GPU host runs torch 2.11.0's triton 3.6.0, whose lowering
tools/gpu_check.sh exercises on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from megatron_speed.kernels import js_triton  # noqa: E402
from megatron_speed.recipes.papers import PAPER_RECIPES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_js_kernel  # noqa: E402

REGISTER_BOUND = 64  # 32 resident warps per SM (js_triton._GPU) x 32 threads x 64 = 65536, an SM's register file
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
PROMPT_TOKENS = 1024  # the paper recipes' prompt limit; the trainer's row width is prompt + response - 1
# Row widths around every token block boundary (128, 256, 512, 1024 fp32 elements) and not multiples of 16.
TRAINER_WIDTHS = (1, 15, 16, 17, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025)
WIDE_ACCESS = re.compile(r"\.(v4\.[bfus]32|v2\.[bfus]64|b128)\b")


@dataclass(frozen=True)
class Case:
    """One call of the kernel: its shapes and layout ("lengths" or "mask"), output dtype and variant."""

    rows: int
    tokens: int
    groups: int
    layout: str
    out_dtype: torch.dtype
    paper: bool


def trainer_cases() -> set[Case]:
    """The trainer calls the lengths layout with float32 output for every James-Stein paper recipe, with
    N = trajectories per step, G = prompts per step and T = the batch's longest row (any width up to
    prompt + response - 1)."""
    cases = set()
    for make in PAPER_RECIPES.values():
        cfg = make()
        if cfg.algorithm.advantage != "js":
            continue
        longest = PROMPT_TOKENS + cfg.rollout.max_new_tokens - 1
        for tokens in {*TRAINER_WIDTHS, longest}:
            for paper in (False, True):  # algorithm.js_lambda_variant
                cases.add(Case(cfg.trajectories_per_step, tokens, cfg.curriculum.prompts_per_step, "lengths",
                               torch.float32, paper))
    return cases


def benchmark_cases() -> set[Case]:
    """tools/bench_js_kernel.py's default grid (tools/gpu_check.sh runs a subset of it)."""
    args = bench_js_kernel.parse_args([])
    return {Case(n, t, n // args.group_size, layout.split("/")[0], torch.bfloat16 if layout.endswith("bf16")
                 else torch.float32, False)
            for n in args.rows for t in args.tokens for layout in args.layouts}


def launches(case: Case) -> list[js_triton.Launch]:
    meta = torch.device("meta")
    rewards = torch.empty(case.rows, device=meta)
    offsets = torch.empty(case.groups + 1, dtype=torch.long, device=meta)
    width = -(-case.tokens // 16) * 16  # js_token_advantages pads its output rows (js_advantage._output)
    out = torch.empty(case.rows, width, dtype=case.out_dtype, device=meta)
    if case.layout == "mask":
        layout = js_triton.TokenLayout(case.tokens, mask=torch.empty(case.rows, case.tokens, dtype=torch.bool,
                                                                     device=meta))
    else:
        spans = torch.empty(case.rows, dtype=torch.long, device=meta)
        layout = js_triton.TokenLayout(case.tokens, start=spans, length=spans)
    return js_triton.plan_launches(rewards, offsets, layout, out, paper=case.paper, eps=1e-6, force_lambda=None,
                                   limits=js_triton._GPU)


def specialise(launch: js_triton.Launch, target: GPUTarget) -> tuple[ASTSource, dict]:
    """What `kernel[grid](*args)` would compile on a device of `target`, by Triton's own binder."""
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constants)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.constants, bound, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def resource_usage(cubin: bytes, tmp: Path) -> tuple[int, int]:
    """(registers per thread, local memory bytes) as cuobjdump reports them for the cubin's kernel."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    report = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                            check=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"LOCAL:(\d+)", report).group(1))


@dataclass(frozen=True)
class Compiled:
    name: str
    ptx: str
    registers: int
    local_bytes: int
    has_mask: bool
    accesses: dict[str, frozenset[str]]  # "token store", "mask load", ... -> the instructions lowered from it


def access_lines() -> dict[str, int]:
    """The source line (in js_triton.py) of each global access that must be 128 bits wide."""
    text = Path(js_triton.__file__).read_text().splitlines()
    needles = {"token store": "tl.store(out_ptr", "mask load": "tl.load(mask_ptr",
               "start load": "tl.load(start_ptr", "length load": "tl.load(length_ptr"}
    lines = {name: [i + 1 for i, line in enumerate(text) if needle in line] for name, needle in needles.items()}
    assert all(len(found) == 1 for found in lines.values()), f"expected one line each: {lines}"
    return {name: found[0] for name, found in lines.items()}


def global_accesses(llir: str) -> dict[str, frozenset[str]]:
    """Name (see `access_lines`) -> the global load/store instructions (`st.global.v4.b32`, ...) lowered
    from that source line, by the `!dbg` location of each inline-asm access in the LLVM IR."""
    debug_line = {m[1]: int(m[2]) for m in re.finditer(r"^!(\d+) = (?:distinct )?!DILocation\(line: (\d+)",
                                                       llir, re.MULTILINE)}
    by_line: dict[int, set[str]] = {}
    for m in re.finditer(r"((?:ld|st)\.global[\w.]*)[^\n]*!dbg !(\d+)", llir):
        by_line.setdefault(debug_line[m[2]], set()).add(m[1])
    return {name: frozenset(by_line[line]) for name, line in access_lines().items() if line in by_line}


def compile_launch(launch: js_triton.Launch, arch: str, tmp: Path) -> tuple[Any, int, int]:
    """(compiled kernel, registers, local bytes) of one launch for `arch`."""
    source, options = specialise(launch, TARGETS[arch])
    kernel = triton.compile(source, target=TARGETS[arch], options=options)
    return kernel, *resource_usage(kernel.asm["cubin"], tmp)


def compile_job(arch: str, case: Case, index: int) -> Compiled:
    """Compile launch `index` of `case` for `arch` (a worker's unit of work)."""
    launch = launches(case)[index]
    with tempfile.TemporaryDirectory() as tmp:
        kernel, registers, local = compile_launch(launch, arch, Path(tmp))
    return Compiled(f"{launch.kernel.fn.__name__} {case} {launch.constants}", kernel.asm["ptx"], registers, local,
                    bool(launch.constants.get("HAS_MASK", False)), global_accesses(kernel.asm["llir"]))


@functools.cache
def compiled() -> dict[str, list[Compiled]]:
    """Every distinct specialisation of the trainer's and the benchmark's calls, compiled for every target
    (deduplicated by what Triton's cache key depends on), on two worker processes: CI has two cores."""
    jobs = []
    for arch in sorted(TARGETS):
        seen = set()
        for case in sorted(trainer_cases() | benchmark_cases(), key=repr):
            for index, launch in enumerate(launches(case)):
                source, options = specialise(launch, TARGETS[arch])
                key = (launch.kernel.fn.__name__, repr(source.signature), repr(sorted(source.constants.items())),
                       repr(sorted(source.attrs.items())), options["num_warps"])
                if key not in seen:
                    seen.add(key)
                    jobs.append((arch, case, index))
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold Triton's threads
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        results = list(pool.map(compile_job, *zip(*jobs)))
    return {arch: [k for (a, _, _), k in zip(jobs, results) if a == arch] for arch in TARGETS}


def test_the_trainer_sweep_reaches_every_token_block() -> None:
    """The widths swept cover every token block and warp count the tiling can choose for fp32 rows."""
    blocks = {(launch.constants["BLOCK_T"], launch.constants["num_warps"])
              for case in trainer_cases() for launch in launches(case)[1:]}
    assert blocks == {(128, 1), (256, 2), (512, 4), (1024, 8)}


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_every_specialisation_divides_exactly_vectorises_and_does_not_spill(arch: str) -> None:
    kernels = compiled()[arch]
    assert {k.name.split()[0] for k in kernels} == {"_group_stats_kernel", "_js_tokens_kernel"}
    assert any(k.has_mask for k in kernels) and any(not k.has_mask for k in kernels)
    for k in kernels:
        assert not re.search(r"div\.(full|approx)", k.ptx), f"{arch} {k.name}: approximate division in the PTX"
        assert "div.rn.f32" in k.ptx, f"{arch} {k.name}: expected correctly rounded division"
        assert k.local_bytes == 0 and ".local" not in k.ptx, f"{arch} {k.name}: local memory (spills)"
        assert k.registers <= REGISTER_BOUND, f"{arch} {k.name}: {k.registers} registers > {REGISTER_BOUND}"
        if k.name.startswith("_js_tokens_kernel"):
            wide = ("token store", "mask load") if k.has_mask else ("token store", "start load", "length load")
            for what in wide:
                found = k.accesses.get(what)
                assert found and all(WIDE_ACCESS.search(i) for i in found), f"{arch} {k.name}: {what} {found}"


def test_the_checks_see_scalar_access_when_rows_are_not_aligned() -> None:
    """Negative control: with an unpadded 1001-token output and mask, stores and mask loads are
    narrower than 128 bits, and the same checks find them."""
    meta = torch.device("meta")
    launch = js_triton.plan_launches(
        torch.empty(64, device=meta), torch.empty(5, dtype=torch.long, device=meta),
        js_triton.TokenLayout(1001, mask=torch.empty(64, 1001, dtype=torch.bool, device=meta)),
        torch.empty(64, 1001, device=meta), paper=False, eps=1e-6, force_lambda=None, limits=js_triton._GPU)[1]
    with tempfile.TemporaryDirectory() as tmp:
        kernel, _, _ = compile_launch(launch, "sm_90", Path(tmp))
    accesses = global_accesses(kernel.asm["llir"])
    assert not all(WIDE_ACCESS.search(i) for i in accesses["token store"])
    assert not all(WIDE_ACCESS.search(i) for i in accesses["mask load"])


def test_the_checks_see_the_registers_of_many_rows_per_thread() -> None:
    """Negative control: the earlier tiling of narrow rows (32 rows x 128 tokens over 8 warps: 4
    non-adjacent rows per thread) exceeds the register bound and loads the spans one row at a time."""
    case = Case(384, 100, 16, "lengths", torch.float32, False)
    launch = launches(case)[1]
    launch = dataclasses.replace(launch, constants={**launch.constants, "BLOCK_R": 32, "BLOCK_T": 128,
                                                    "num_warps": 8})
    with tempfile.TemporaryDirectory() as tmp:
        kernel, registers, _ = compile_launch(launch, "sm_90", Path(tmp))
    assert registers > REGISTER_BOUND
    assert not all(WIDE_ACCESS.search(i) for i in global_accesses(kernel.asm["llir"])["start load"])
