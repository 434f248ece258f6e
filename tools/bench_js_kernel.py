"""Benchmark the fused James-Stein token-advantage kernel (`megatron_speed.kernels.js_token_advantages`).

For every N x T and layout (mask/fp32, lengths/fp32, mask/bf16) it reports:
- the median time of one call (`triton.testing.do_bench`, L2 flushed between runs);
- GB/s over the minimum bytes the call must move: the bool mask read (mask layouts) plus the output
  write; the lengths layout moves only the output (the N-sized inputs are ignored: < 0.1 %);
- that bandwidth as a percentage of a device-to-device copy moving the same bytes (B/2 bytes
  read + B/2 written), measured in the same run, i.e. how close the kernel gets to memcpy;
- the speedup over the eager PyTorch reference (`js_token_advantages*_reference`) and over
  `torch.compile` of it (graph breaks at the offsets checks are part of what the reference costs).

Groups are equal (16 samples per prompt by default; `--group-size`). Run on a CUDA machine:

    python tools/bench_js_kernel.py --out runs/bench_js_kernel.json

Without CUDA it prints why and exits with status 2. The largest shape (65536 x 32768) needs about
40 GiB of GPU memory for the references; `--skip-compile` saves most of the compile time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_speed.kernels import (
    js_token_advantages,
    js_token_advantages_from_lengths,
    js_token_advantages_from_lengths_reference,
    js_token_advantages_reference,
)

LAYOUTS = ("mask/fp32", "lengths/fp32", "mask/bf16")


@dataclass(frozen=True)
class Result:
    """One row of the table; times in milliseconds, None where a baseline could not run."""

    layout: str
    rows: int
    tokens: int
    kernel_ms: float
    gb_per_s: float
    copy_percent: float
    eager_speedup: float | None
    compiled_speedup: float | None
    copy_ms: float
    eager_ms: float | None
    compiled_ms: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 8192, 65536], help="N, trajectories")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768], help="T, tokens per row")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--group-size", type=int, default=16, help="samples per prompt (equal groups)")
    parser.add_argument("--skip-compile", action="store_true", help="do not time torch.compile of the reference")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.group_size < 1 or any(n % args.group_size for n in args.rows):
        parser.error(f"--group-size ({args.group_size}) must be >= 1 and divide every --rows value {args.rows}")
    return args


def make_inputs(rows: int, tokens: int, group_size: int) -> dict[str, torch.Tensor]:
    """Binary rewards, equal groups, ragged responses (length uniform in [1, T]) as mask and as spans."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    length = torch.randint(1, tokens + 1, (rows,), device="cuda", generator=gen)
    start = torch.zeros(rows, dtype=torch.long, device="cuda")
    return {
        "rewards": torch.randint(0, 2, (rows,), device="cuda", generator=gen).float(),
        "offsets": torch.arange(0, rows + 1, group_size, device="cuda"),
        "mask": torch.arange(tokens, device="cuda") < length[:, None],
        "start": start,
        "length": length,
    }


def calls(layout: str, x: dict[str, torch.Tensor], tokens: int,
          compiled: Callable[..., torch.Tensor] | None) -> dict[str, Callable[[], object] | None]:
    """The three timed callables of one layout: kernel, eager reference, compiled reference."""
    dtype = torch.bfloat16 if layout.endswith("bf16") else torch.float32
    if layout.startswith("mask"):
        args = (x["rewards"], x["offsets"], x["mask"], "code", dtype)
        kernel, reference = js_token_advantages, js_token_advantages_reference
    else:
        args = (x["rewards"], x["offsets"], x["start"], x["length"], tokens, "code", dtype)
        kernel, reference = js_token_advantages_from_lengths, js_token_advantages_from_lengths_reference
    compiled_reference = compiled(reference) if compiled is not None else None
    return {"kernel": lambda: kernel(*args), "eager": lambda: reference(*args),
            "compiled": (lambda: compiled_reference(*args)) if compiled_reference is not None else None}


def timed(fn: Callable[[], object] | None, rep_ms: int) -> float | None:
    """Median ms of `fn` (None if it is None or fails, e.g. out of memory); frees memory afterwards."""
    import triton.testing

    if fn is None:
        return None
    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    except (RuntimeError, torch.OutOfMemoryError) as error:  # a baseline that cannot run is reported, not fatal
        print(f"  skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}", file=sys.stderr)
        return None
    finally:
        torch.cuda.empty_cache()


def copy_ms(num_bytes: int, rep_ms: int) -> float:
    """Median ms of a device-to-device copy that reads num_bytes/2 and writes num_bytes/2."""
    source = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    result = timed(lambda: target.copy_(source), rep_ms)
    assert result is not None
    return result


def bench_shape(rows: int, tokens: int, args: argparse.Namespace,
                compiler: Callable[..., torch.Tensor] | None) -> list[Result]:
    """All layouts for one N x T (inputs built once; the copy baseline measured per byte count)."""
    x = make_inputs(rows, tokens, args.group_size)
    results = []
    for layout in args.layouts:
        out_bytes = rows * tokens * (2 if layout.endswith("bf16") else 4)
        num_bytes = out_bytes + (rows * tokens if layout.startswith("mask") else 0)
        fns = calls(layout, x, tokens, compiler)
        kernel, eager, compiled = (timed(fns[k], args.rep_ms) for k in ("kernel", "eager", "compiled"))
        assert kernel is not None, f"the kernel failed on {layout} {rows}x{tokens}"
        copy = copy_ms(num_bytes, args.rep_ms)
        results.append(Result(layout=layout, rows=rows, tokens=tokens, kernel_ms=kernel,
                              gb_per_s=num_bytes / kernel / 1e6, copy_percent=100.0 * copy / kernel,
                              eager_speedup=eager / kernel if eager else None,
                              compiled_speedup=compiled / kernel if compiled else None,
                              copy_ms=copy, eager_ms=eager, compiled_ms=compiled))
        print(format_row(results[-1]), flush=True)
    return results


def format_row(r: Result) -> str:
    def speedup(value: float | None) -> str:
        return f"{value:9.1f}x" if value is not None else f"{'n/a':>10}"

    return (f"{r.layout:<13} {r.rows:>6} {r.tokens:>6} {r.kernel_ms * 1e3:>10.1f} {r.gb_per_s:>8.0f} "
            f"{r.copy_percent:>6.0f}% {speedup(r.eager_speedup)} {speedup(r.compiled_speedup)}")


def machine() -> dict[str, str]:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_js_kernel: no CUDA device is visible; this benchmark times the compiled Triton kernel "
              "and needs an NVIDIA GPU. Run it on a GPU host.", file=sys.stderr)
        return 2
    info = machine()
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'layout':<13} {'N':>6} {'T':>6} {'kernel us':>10} {'GB/s':>8} {'%copy':>7} {'vs eager':>10} "
          f"{'vs compile':>10}")
    compiler = None if args.skip_compile else torch.compile
    results = [r for n in args.rows for t in args.tokens for r in bench_shape(n, t, args, compiler)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "group_size": args.group_size, "results": [asdict(r) for r in results]}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
