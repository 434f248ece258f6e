#!/usr/bin/env bash
# The GPU check (issue 12): what CI cannot show on CPU, in two stages of under 5 minutes each, for a bare
# H100/H200 host whose image has torch 2.11 + triton 3.6 + transformers but no megatron-core or vLLM.
#
#   tools/gpu_check.sh [--plan] [--stage 1|2|all] [--wheels DIR] OUT_DIR
#   tools/gpu_check.sh --pins        # the extra pins to stage: ../shared/gpu/stage-wheels.sh $(tools/gpu_check.sh --pins)
#
# Stage 1 (needs the megatron-core, math-verify and pytest wheels, a few MiB, in --wheels DIR):
#   the kernels' GPU tests (pytest -m gpu: the James-Stein kernel, compiled FlexAttention for packed rows),
#   tools/bench_js_kernel.py, and tools/bench_actor.py at small sizes on full rows (local vs SDPA) and on
#   RL-shaped long-tail rows (padded vs packed).
# Stage 2 (needs the staged vLLM wheels too: ../shared/gpu/stage-wheels.sh, unpacked into --wheels DIR):
#   the engine's GPU test (sleep/wake, bucketed refit) and tools/bench_rollout.py at small sizes.
# The image has no pytest: its wheels (pytest, iniconfig, pluggy, pygments: pytest 9.2's requirements on
# Python 3.12, and packaging, installed only where the image lacks packaging>=24) are staged with --pins.
# Each stage writes under OUT_DIR/stage<N>/: every command's log, the benchmarks' JSON, pytest's junit XML,
# and summary.json + summary.md (tools/gpu_check_report.py): status and seconds per command, the figures.
# Wheels are installed with --no-deps into a private target (GPU_CHECK_SITE, default /tmp/site), never into
# the image's environment. --plan prints what would run (CI runs it: tests/unit/test_gpu_check.py).
# Exit status: 0 when every command of the selected stages passed, 1 otherwise, 2 on bad arguments.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/site}
wheels=${GPU_CHECK_WHEELS:-/tmp/stage/w}
plan=0
stages="1 2"
out=""
# pytest as pinned in pyproject.toml's `test` extra, and its requirements (tests/unit/test_gpu_check.py checks both).
test_pins="pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0 packaging==26.4"

usage() { sed -n '4,6p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --pins) echo "$test_pins"; exit 0 ;;
    --plan) plan=1 ;;
    --stage) shift; case "${1:-}" in 1|2) stages=$1 ;; all) stages="1 2" ;; *) usage ;; esac ;;
    --wheels) shift; wheels=${1:-}; [ -n "$wheels" ] || usage ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || usage

# One line per command: NAME|TIMEOUT_SECONDS|COMMAND. The timeouts of a stage add up to under 300 s.
stage_commands() {
  local dir=$1
  case "$2" in
    1)
      echo "kernel_gpu_tests|100|$py -m pytest -q -m gpu tests/gpu/test_js_kernel_gpu.py tests/gpu/test_packed_attention_gpu.py --junitxml=$dir/kernel_gpu_tests.xml"
      echo "bench_js_kernel|40|$py tools/bench_js_kernel.py --rows 1024 8192 --tokens 1024 8192 --skip-compile --rep-ms 50 --out $dir/bench_js_kernel.json"
      echo "bench_actor|70|$py tools/bench_actor.py --shape qwen2.5-0.5b --seq 2048 --micro-batches 2 --steps 3 --warmup 1 --backends local sdpa --cache $out/models --out $dir/bench_actor.json"
      echo "bench_actor_packing|85|$py tools/bench_actor.py --shape qwen2.5-0.5b --seq 2048 --lengths longtail --batching fixed packed --backends sdpa --micro-batch 4 --micro-batches 2 --micro-batch-tokens 8192 --steps 2 --warmup 1 --cache $out/models --out $dir/bench_actor_packing.json"
      ;;
    2)
      echo "engine_gpu_tests|120|$py -m pytest -q -m gpu tests/gpu/test_engine_gpu.py --junitxml=$dir/engine_gpu_tests.xml"
      echo "bench_rollout|170|$py tools/bench_rollout.py --shape qwen2.5-0.5b --prompts 64 --n 4 --max-tokens 256 --max-len 512 --rounds 2 --refits 2 --kv-gib 8 --cache $out/models --out $dir/bench_rollout.json"
      ;;
  esac
}

# Which wheels a stage installs (globs under --wheels DIR): stage 1 the small ones, stage 2 all of them.
stage_wheels() {
  case "$1" in
    1) echo "megatron_core-*.whl math_verify-*.whl latex2sympy2_extended-*.whl antlr4_python3_runtime-*.whl" \
            "pytest-*.whl iniconfig-*.whl pluggy-*.whl pygments-*.whl packaging-*.whl" ;;
    2) echo "*.whl" ;;
  esac
}

# The image's own packaging (torch and transformers use it) is kept unless it is missing or older than pytest needs.
image_has_packaging() {
  $py -c 'import packaging, sys; sys.exit(int(packaging.__version__.split(".")[0]) < 24)' 2>/dev/null
}

install_wheels() {
  local files=() pattern keep_packaging=0
  image_has_packaging && keep_packaging=1
  for pattern in $(stage_wheels "$1"); do
    for f in "$wheels"/$pattern; do
      [ -e "$f" ] || continue
      [ "$keep_packaging" -eq 1 ] && [[ $(basename "$f") == packaging-* ]] && continue
      files+=("$f")
    done
  done
  if [ ${#files[@]} -eq 0 ]; then
    echo "gpu_check: no wheels matching '$(stage_wheels "$1")' in $wheels (--wheels DIR)" >&2
    return 1
  fi
  $py -m pip install -q --no-index --no-deps --no-compile --target "$site" --upgrade "${files[@]}"
}

run_stage() {
  local stage=$1 dir="$out/stage$1" name limit cmd started rc
  mkdir -p "$dir"
  : > "$dir/commands.tsv"
  echo "== stage $stage: installing wheels from $wheels into $site"
  if ! install_wheels "$stage" > "$dir/install.log" 2>&1; then
    cat "$dir/install.log" >&2
    printf 'install_wheels\t1\t0\t%s\n' "$dir/install.log" >> "$dir/commands.tsv"
  fi
  while IFS='|' read -r name limit cmd; do
    echo "== stage $stage: $name (at most ${limit}s)"
    started=$(date +%s)
    (cd "$root" && PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" VLLM_ENABLE_V1_MULTIPROCESSING=0 \
      timeout --kill-after=10 "$limit" bash -c "$cmd") < /dev/null > "$dir/$name.log" 2>&1
    rc=$?
    tail -n 3 "$dir/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - started ))" "$dir/$name.log" >> "$dir/commands.tsv"
  done < <(stage_commands "$dir" "$stage")
  $py "$root/tools/gpu_check_report.py" "$dir" --stage "$stage"
}

if [ "$plan" -eq 1 ]; then
  for stage in $stages; do
    echo "stage $stage: install $(stage_wheels "$stage") from $wheels into $site (pip --no-index --no-deps --target;" \
         "packaging only where the image lacks packaging>=24)"
    stage_commands "$out/stage$stage" "$stage" | while IFS='|' read -r name limit cmd; do
      echo "stage $stage: $name (timeout ${limit}s): $cmd"
    done
    echo "stage $stage: report: $py tools/gpu_check_report.py $out/stage$stage --stage $stage" \
         "-> $out/stage$stage/summary.json, $out/stage$stage/summary.md"
  done
  exit 0
fi

status=0
for stage in $stages; do
  run_stage "$stage" || status=1
done
exit $status
