"""The James-Stein kernel compiled ahead of time for Hopper (sm_90) and Ampere (sm_80) on a CPU machine.

Triton lowers a kernel for a target with no device present (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` returns PTX, cubin and metadata). Every launch the trainer and the
benchmark make is planned by the kernel's own `plan_launches` on meta tensors (same tiling, same
arguments), specialised by Triton's own binder (pointer alignment, integers divisible by 16 or equal
to 1: what the JIT would see on the GPU), deduplicated, and compiled. Each compiled kernel must have:

* no approximate division (`div.full.f32` / `div.approx`): the per-group and per-row math divides with
  `tl.div_rn`, correctly rounded as in the interpreter and in PyTorch;
* 128-bit global stores of the token tiles (every `st.global` of the token kernel is `.v4`), and on
  the mask layout 128-bit mask loads (no byte-wide `ld.global.b8`/`.u8`);
* no local memory (no spills: cuobjdump `LOCAL:0`, no `.local` in the PTX);
* at most REGISTER_BOUND (64) registers per thread (cuobjdump `REG`), so the 4 programs of 8 warps that
  the persistent grid places on each SM are resident together.

The Triton here is 3.9.0 (the CPU set); the GPU host runs torch 2.11.0's triton 3.6.0, whose lowering
tools/gpu_check.sh exercises on the device.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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

REGISTER_BOUND = 64  # 4 resident programs (js_triton._GPU) x 8 warps x 32 threads x 64 = 65536, an SM's register file
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
PROMPT_TOKENS = 1024  # the paper recipes' prompt limit; the trainer's row width is prompt + response - 1


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
    """The trainer calls the lengths layout with float32 output for every James-Stein paper recipe."""
    cases = set()
    for make in PAPER_RECIPES.values():
        cfg = make()
        if cfg.algorithm.advantage != "js":
            continue
        tokens = PROMPT_TOKENS + cfg.rollout.max_new_tokens - 1
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


@dataclass(frozen=True)
class Compiled:
    name: str
    ptx: str
    registers: int
    local_bytes: int
    has_mask: bool


def resource_usage(cubin: bytes, tmp: Path) -> tuple[int, int]:
    """(registers per thread, local memory bytes) as cuobjdump reports them for the cubin's kernel."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    report = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                            check=True).stdout
    return int(re.search(r"REG:(\d+)", report).group(1)), int(re.search(r"LOCAL:(\d+)", report).group(1))


@functools.cache
def compiled_for(arch: str) -> list[Compiled]:
    """Every distinct specialisation of the trainer's and the benchmark's calls, compiled for `arch`."""
    import tempfile

    target, seen, out = TARGETS[arch], set(), []
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(trainer_cases() | benchmark_cases(), key=repr):
            for launch in launches(case):
                source, options = specialise(launch, target)
                key = (launch.kernel.fn.__name__, repr(source.signature), repr(sorted(source.constants.items())),
                       repr(sorted(source.attrs.items())), options["num_warps"])
                if key in seen:
                    continue
                seen.add(key)
                kernel = triton.compile(source, target=target, options=options)
                registers, local = resource_usage(kernel.asm["cubin"], Path(tmp))
                out.append(Compiled(f"{key[0]} {case}", kernel.asm["ptx"], registers, local,
                                    bool(launch.constants.get("HAS_MASK", False))))
    return out


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_every_specialisation_divides_exactly_vectorises_and_does_not_spill(arch: str) -> None:
    kernels = compiled_for(arch)
    assert {k.name.split()[0] for k in kernels} == {"_group_stats_kernel", "_js_tokens_kernel"}
    assert any(k.has_mask for k in kernels) and any(not k.has_mask for k in kernels)
    for k in kernels:
        assert not re.search(r"div\.(full|approx)", k.ptx), f"{arch} {k.name}: approximate division in the PTX"
        assert "div.rn.f32" in k.ptx, f"{arch} {k.name}: expected correctly rounded division"
        assert k.local_bytes == 0 and ".local" not in k.ptx, f"{arch} {k.name}: local memory (spills)"
        assert k.registers <= REGISTER_BOUND, f"{arch} {k.name}: {k.registers} registers > {REGISTER_BOUND}"
        if k.name.startswith("_js_tokens_kernel"):
            stores = re.findall(r"st\.global\S*", k.ptx)
            assert stores and all(".v4." in s for s in stores), f"{arch} {k.name}: token stores {set(stores)}"
            if k.has_mask:
                assert not re.search(r"ld\.global(\.\w+)*\.[bus]8\b", k.ptx), f"{arch} {k.name}: byte-wide mask loads"


def test_the_checks_see_scalar_access_when_rows_are_not_aligned() -> None:
    """Negative control: with an unpadded 1001-token output and mask, stores and mask loads are
    narrower than 128 bits, and the same regular expressions find them."""
    case = Case(64, 1001, 4, "mask", torch.float32, False)
    meta = torch.device("meta")
    launch = js_triton.plan_launches(
        torch.empty(64, device=meta), torch.empty(5, dtype=torch.long, device=meta),
        js_triton.TokenLayout(case.tokens, mask=torch.empty(64, 1001, dtype=torch.bool, device=meta)),
        torch.empty(64, 1001, device=meta), paper=False, eps=1e-6, force_lambda=None, limits=js_triton._GPU)[1]
    source, options = specialise(launch, TARGETS["sm_90"])
    ptx = triton.compile(source, target=TARGETS["sm_90"], options=options).asm["ptx"]
    assert any(".v4." not in s for s in re.findall(r"st\.global\S*", ptx))
    assert re.search(r"ld\.global(\.\w+)*\.[bus]8\b", ptx)
