#!/usr/bin/env bash
# The GPU check: one command for a GPU machine lent for a few minutes, with no network access.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh --budget 480 --arch-only
#
# Stages, in order of value; each gets its own slice of --budget (seconds, default 480) and is killed
# (its whole process group) when the slice is spent, marked "timed out", and the next stage runs:
#   build         pip install -e . with every core; --arch-only builds the running GPU's arch only (90a on Hopper)
#                 (skipped when an earlier call built _C from the same sources: build/gpu_check-build.key)
#   info          vit_kernels.build_info(), nvidia-smi
#   smoke         benchmarks/smoke_parity.py: op x backend x dtype at two ViT shapes vs float64, fwd + every grad
#   headline      benchmarks/headline.py: ViT-B/16 attention, fused_qkv, gelu_mlp, whole model; one ratio table
#   tests         pytest on every test file that runs kernels on the device (-n auto when pytest-xdist is importable)
#   attn_tables, mlp_tables, vit_tables, block_tables    the benchmark tables; torch.compile only where it is the
#                 baseline a user would pick: timm's ViT-B/16 (vit_tables) and one block (block_tables)
#   profile       Nsight Compute per kernel launch, one fwd + bwd of each op and backend (benchmarks/profile_kernels.py)
#   gemm_ab       benchmarks/probe_gemm.py --variants: every GEMM of a ViT-B/16 block on the Hopper TMA kernels, on
#                 the pointer kernel they replaced and on cuBLAS, plus the ops end to end on both paths
#   pytest_bench  the pytest-benchmark suite (benchmarks/test_bench_ops.py): a JSON to `compare` later runs with
#   memcheck, racecheck    compute-sanitizer on a small script, every kernel backend, fwd and bwd
#   tune          benchmarks/tune_attention.py at ViT-B/16 and ViT-H/14 224
#   compile_tables torch.compile rows of attn_bench and mlp_bench at ViT-B/16
#   auto_table    benchmarks/auto_table.py over the attn, mlp and block tables' JSON (without attn_tables: this GPU's
#                 newest committed attention table)
#   vit_auto      vit_bench's ViT-B/16 on `auto` with the table auto_table proposed (VIT_KERNELS_MEASURED_TABLE)
# A slice is the budget still left times the stage's share of the nominal seconds of the stages still to
# come (NOMINAL below), so time a stage does not use (or a skipped stage) goes to the rest.
#
# After EVERY stage the Markdown report is rewritten (benchmarks/out/<gpu>-<date>.md, which git ignores;
# --results-dir benchmarks/results to write it where it is committed), and, when $OUT or --out is set, the report
# and one .tar.gz of every log and result file are (re)written there (two files; each replaced atomically; without
# OUT the .tar.gz goes beside the report). A report or tarball that exists already is never replaced: a rerun's
# files get -2, -3, ... Without a CUDA device the GPU stages are marked "skipped: no CUDA device" and the report
# is still written.
# Exit status: 1 if a stage failed, timed out, or was asked for and did not run ("not run: <reason>": the budget
# was spent, a tool is missing, or the device probe failed: python could not run or import torch, which is not
# the same as no GPU); "skipped: no CUDA device" and "skipped: not in --only" are no failures. 2: bad arguments
# (an unknown stage in --only), before anything runs.
#
# Options: --budget S, --out DIR, --arch-only, --no-build, --results-dir DIR (default benchmarks/out),
# --only a,b (run only these stages). PYTHON=/path/to/python picks the interpreter.
# --record-build ARCH (no GPU needed): only build _C for ARCH (90a) with PYTHON and record its key, so that a GPU
# machine with that Python, handed the module and build/gpu_check-build.key, skips its build (README, GPU check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
start=$(date +%s)
# The checkout's vit_kernels and vit come first even when the build stage is skipped or killed (then without
# the CUDA extension: the cuda backend is skipped with its reason and the Triton one still runs).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

budget=480
out=${OUT:-}
results_dir=benchmarks/out  # untracked: benchmarks/results/ only when asked
arch_only=0
no_build=0
record_build=""
only=""
declare -A fake=()  # --fake-stage NAME=SECONDS (for the tests): that stage sleeps instead of running
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --results-dir) results_dir=$2; shift 2 ;;
    --arch-only) arch_only=1; shift ;;
    --no-build) no_build=1; shift ;;
    --record-build) record_build=$2; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    --fake-stage) fake[${2%%=*}]=${2#*=}; shift 2 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, got $budget" >&2; exit 2; }

STAGES=(build info smoke headline tests attn_tables mlp_tables vit_tables block_tables profile gemm_ab pytest_bench
  memcheck racecheck tune compile_tables auto_table vit_auto)
# Nominal seconds of each stage on a cold H100 / H200, from the runs there (2026-11-26/27, README "GPU check"): the
# measured time plus a margin, or, for a stage killed at its slice, a guess above that slice (racecheck: 44 s on
# the H100, killed at 54 s on the H200; attn_tables: 43 s for 8 shapes, now 10). Guesses, never run as they are now:
# build (19-26 s before the two CUTLASS units, each ~75 s of nvcc alone on this 2-core machine, side by side on the
# GPU machine; ~0 s with a _C carried in, --record-build), gemm_ab (~40 Triton rows, ~12 compiles, and the cuda
# backend's products), vit_tables (ViT-B/16 only, five eager providers and timm under torch.compile, ~a minute of
# compilation per mode) and block_tables (five providers and torch.compile of one block, fwd and fwd + bwd).
# They sum to ~1,100 s, more than one 10-minute call: a lease runs them in two calls with --only (README).
declare -A NOMINAL=([build]=95 [info]=12 [smoke]=35 [headline]=40 [tests]=200 [attn_tables]=75 [mlp_tables]=15
  [vit_tables]=150 [block_tables]=60 [profile]=60 [gemm_ab]=120 [pytest_bench]=20 [memcheck]=20 [racecheck]=90
  [tune]=60 [compile_tables]=60 [auto_table]=10 [vit_auto]=25)
declare -A status=() secs=() slice_of=()
# A typo in --only would skip every stage and exit 0: a stage name must be one of STAGES, before anything runs.
usage_error() {  # MESSAGE
  echo "gpu_check.sh: $1 (stages: ${STAGES[*]})" >&2
  exit 2
}
if [ -n "$only" ]; then
  IFS=, read -ra asked <<<"${only:1:${#only}-2}"
  [ ${#asked[@]} -gt 0 ] || usage_error "--only names no stage"
  unknown=()
  for s in "${asked[@]}"; do [[ -n $s && " ${STAGES[*]} " == *" $s "* ]] || unknown+=("${s:-\"\"}"); done
  printf -v bad_names '%s, ' "${unknown[@]}"
  [ ${#unknown[@]} -eq 0 ] || usage_error "unknown stage(s) in --only: ${bad_names%, }"
fi
for s in "${!fake[@]}"; do
  [[ " ${STAGES[*]} " == *" $s "* ]] || usage_error "unknown stage in --fake-stage: $s"
  [[ ${fake[$s]} =~ ^[0-9]+$ ]] || usage_error "--fake-stage $s needs whole seconds, got ${fake[$s]}"
done
MIN_SLICE=30  # even a short stage (info: one Python import) gets this much, up to half of what is left
RESERVE=6  # seconds kept back for the last report and tarball, and timeout's grace before its KILL

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
# The work folder goes when the script ends, however it ends; the report and the tarball were copied out of it
# after every stage. INT, TERM and HUP exit through that trap too.
trap 'rm -rf -- "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
mkdir -p "$work/results" "$results_dir"
logs_dir=${out:-$results_dir}  # where the tarball goes

# ---------------------------------------------------------------------------------------------------
# the device
# ---------------------------------------------------------------------------------------------------
# Paths reach Python through argv, never pasted into its source (a ' in TMPDIR would be a SyntaxError).
timeout 60 "$PY" - "$work/versions.txt" >"$work/gpu_probe.out" 2>"$work/gpu_probe.log" <<'EOF'
import sys

import torch

try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = None
with open(sys.argv[1], "w") as f:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}", file=f)
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}{minor}|{torch.cuda.get_device_name()}")
else:
    print("|")
EOF
probe_rc=$?
gpu_probe=$(tail -n 1 "$work/gpu_probe.out")
# A probe that could not look (python missing, torch not importable, a hang) is not "no GPU": the stages that
# need one are then "not run", and the exit status says so.
probe_error=""
if [ $probe_rc -ne 0 ]; then
  probe_error="$PY exited $probe_rc"
  [ $probe_rc -eq 124 ] && probe_error="$probe_error (killed after 60 s)"
elif ! [[ $gpu_probe =~ ^([0-9]+\|.+|\|)$ ]]; then
  probe_error="$PY printed ${gpu_probe:-nothing}, not <capability>|<name>"
fi
if [ -n "$probe_error" ]; then
  last_line=$(grep -v '^[[:space:]]*$' "$work/gpu_probe.log" | tail -n 1)
  probe_error="$probe_error${last_line:+: $last_line}"
  gpu_probe="|"
fi
cap=${gpu_probe%%|*}
gpu_name=${gpu_probe#*|}
has_gpu=0
[ -n "$cap" ] && has_gpu=1
no_gpu_status="skipped: no CUDA device"  # what a stage that needs a GPU says without one
if [ -n "$probe_error" ]; then
  gpu_name="unknown device (the device probe failed)"
  no_gpu_status="not run: the device probe failed"
elif [ $has_gpu = 0 ]; then
  gpu_name="no GPU ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs))"
fi
slug=$(echo "${gpu_name%% (*}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
stamp=$(date -u +%Y-%m-%d)
# An earlier report of the same GPU and day (a committed one, the first of two calls) is never replaced.
report_name="$slug-$stamp"
for ((n = 2; ; n++)); do
  [ -e "$results_dir/$report_name.md" ] || [ -e "$logs_dir/$report_name.md" ] ||
    [ -e "$logs_dir/gpu_check-$report_name.tar.gz" ] || break
  report_name="$slug-$stamp-$n"
done
report="$results_dir/$report_name.md"
tarball="gpu_check-$report_name.tar.gz"
peaks="$work/results/peaks.json"

# ---------------------------------------------------------------------------------------------------
# the report: rewritten after every stage
# ---------------------------------------------------------------------------------------------------
stage_line() {  # the status of a stage, as the report lists it
  local s=$1
  case ${status[$s]:-pending} in
    ran:*) echo "ran, exit ${status[$s]#ran:}, ${secs[$s]} s of a ${slice_of[$s]} s slice" ;;
    timeout) echo "timed out: killed after its ${slice_of[$s]} s slice" ;;
    *) echo "${status[$s]:-pending}" ;;
  esac
}

digest() {  # what of a stage's log goes into the report
  local s=$1 log="$work/$1.log"
  [ -s "$log" ] || return 0
  case $s in
    smoke) grep -E " (PASS|FAIL|ERROR|SKIP)|^smoke parity" "$log" ;;
    tests)
      echo "$(grep -cE ' PASSED' "$log") PASSED lines, $(grep -cE ' SKIPPED' "$log") SKIPPED lines so far"
      grep -E "^(FAILED|ERROR) | FAILED | ERROR |^=+ .*(passed|failed|error)|no tests ran" "$log" | tail -n 40
      # the assertion line of each failure, from the log written as they happen (whole tracebacks in the tarball)
      [ -s "$work/test_failures.log" ] && grep -E "^=== |^E  " "$work/test_failures.log" | cut -c1-300 | head -n 80 ;;
    memcheck | racecheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|error|^ok|^done:|backends" "$log" | tail -n 25 ;;
    headline | *_tables | tune | auto_table | profile)
      grep -vE "^(wrote |=== )" "$log" | tail -n 120 ;;
    pytest_bench) grep -E "^(Name|[-]{5}|test_)|passed|failed|error" "$log" | tail -n 60 ;;
    *) tail -n 25 "$log" ;;
  esac
}

# What does not change during the run, collected once. A copy of the tree without .git names its commit
# through GPU_CHECK_COMMIT.
commit=$(git rev-parse HEAD 2>/dev/null)
if [ -n "$commit" ]; then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit (dirty)"
else
  commit="${GPU_CHECK_COMMIT:-unknown: no git checkout here (GPU_CHECK_COMMIT=<sha> names it)}"
fi
cuda_tool() {  # NAME: its path on PATH, else in /usr/local/cuda/bin, else nothing
  command -v "$1" || { [ -x "/usr/local/cuda/bin/$1" ] && echo "/usr/local/cuda/bin/$1"; } || true
}

header="- commit: $commit
- python: $("$PY" --version 2>&1 | head -n 1); $(cat "$work/versions.txt" 2>/dev/null)
- driver: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
- nvcc: $(nvcc=$(cuda_tool nvcc); [ -n "$nvcc" ] && "$nvcc" --version 2>/dev/null | tail -1)"
[ -n "$probe_error" ] && header="$header
- device probe: FAILED: $probe_error (gpu_probe.log in the tarball)"

write_report() {
  local tmp="$work/report.md.tmp" s
  {
    echo "# GPU check: $gpu_name, $stamp"
    echo
    echo "$header"
    echo "- host: $(hostname), $(nproc) CPU cores; budget $budget s, $(( $(date +%s) - start )) s elapsed at this writing"
    echo
    echo "## Stages"
    echo
    for s in "${STAGES[@]}"; do echo "- $s: $(stage_line "$s")"; done
    for s in "${STAGES[@]}"; do
      case ${status[$s]:-pending} in ran:* | timeout) ;; *) continue ;; esac
      echo
      echo "## $s ($(stage_line "$s"))"
      echo
      if [[ $s =~ _tables$|^headline$|^tune$|^auto_table$ ]]; then digest "$s"; else echo '```'; digest "$s"; echo '```'; fi
    done
    echo
    echo "Logs and result files: $tarball (the full log of each stage, <stage>.log; results/)."
  } >"$tmp"
  cp "$tmp" "$work/report.md"
  cp "$tmp" "$report.tmp" && mv "$report.tmp" "$report"
  if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$tmp" "$out/.report.md.tmp" && mv "$out/.report.md.tmp" "$out/$(basename "$report")"
  fi
  tar -czf "$logs_dir/.tarball.tmp" -C "$work" --exclude=report.md.tmp . 2>/dev/null &&
    mv "$logs_dir/.tarball.tmp" "$logs_dir/$tarball"
}

# ---------------------------------------------------------------------------------------------------
# one stage: its slice, its own process group (timeout kills the group), its log, the report
# ---------------------------------------------------------------------------------------------------
finish_stage() {  # NAME STATUS
  status[$1]=$2
  echo "=== $1: $(stage_line "$1")"
  write_report
}

wanted() {  # NAME: whether --only (if given) names this stage
  [ -z "$only" ] || [[ $only == *",$1,"* ]]
}

stage() {  # NAME NEEDS_GPU CMD...
  local name=$1 needs_gpu=$2 s left weights=0 slice floor rc t0
  shift 2
  if ! wanted "$name"; then finish_stage "$name" "skipped: not in --only"; return; fi
  if [ -n "${fake[$name]:-}" ]; then
    # a child of its own, so the tests can see that the whole process group is killed, not just the shell
    set -- bash -c "sleep ${fake[$name]} & echo \"fake $name: child \$!\"; wait"
  elif [ "$needs_gpu" = 1 ] && [ $has_gpu = 0 ]; then
    finish_stage "$name" "$no_gpu_status"
    return
  fi
  for s in "${STAGES[@]}"; do
    [ -z "${status[$s]:-}" ] && wanted "$s" && weights=$((weights + NOMINAL[$s]))
  done
  left=$((budget - ($(date +%s) - start) - RESERVE))
  slice=$((left * NOMINAL[$name] / weights))
  # A short stage (info) still gets a usable slice when the budget is small.
  floor=$((left / 2 < MIN_SLICE ? left / 2 : MIN_SLICE))
  [ $slice -lt $floor ] && slice=$floor
  if [ $slice -lt 3 ]; then finish_stage "$name" "not run: budget spent ($left s left)"; return; fi
  slice_of[$name]=$slice
  echo "=== $name: $* (slice $slice s)"
  t0=$(date +%s)
  timeout --kill-after=3 "$slice" "$@" >"$work/$name.log" 2>&1 </dev/null
  rc=$?
  secs[$name]=$(($(date +%s) - t0))
  tail -n 12 "$work/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "(killed: its $slice s slice ran out)" >>"$work/$name.log"
    finish_stage "$name" timeout
  else
    finish_stage "$name" "ran:$rc"
  fi
}

optional() {  # NAME REASON: a stage asked for that cannot run here for a reason other than the device (a failure)
  if ! wanted "$1"; then finish_stage "$1" "skipped: not in --only"; return; fi
  finish_stage "$1" "not run: $2"
}


# ---------------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------------
# 1. build (the build requirements must already be installed: no network)
arch_args=()
if [ -n "$record_build" ]; then
  arch_args=("CMAKE_ARGS=${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=$record_build")
elif [ $arch_only = 1 ] && [ $has_gpu = 1 ]; then
  arch=$cap
  [ "${cap:0:1}" = 9 ] && [ ${#cap} = 2 ] && arch="${cap}a"  # wgmma needs sm_90a
  arch_args=("CMAKE_ARGS=${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=$arch")
fi
# The cuda backend's sm_90a GEMMs need CUTLASS's headers, which an offline GPU machine cannot download: a folder
# carried in beside the checkout (README, Build) is used unless VIT_KERNELS_CUTLASS_DIR names another.
if [ -z "${VIT_KERNELS_CUTLASS_DIR:-}" ] && [ -f cutlass-4.2/include/cutlass/cutlass.h ]; then
  export VIT_KERNELS_CUTLASS_DIR="$PWD/cutlass-4.2"
fi
# A call skips the build when the checkout already holds a _C built from these sources with these settings for
# this interpreter (build/gpu_check-build.key, written after each build) and it imports: the second call of a
# lease on a warm machine (pip's editable build compiles in a fresh temporary folder each time, ~90 s there), or a
# first call that carries in a _C built here with --record-build (README, GPU check).
build_key_file=${GPU_CHECK_BUILD_KEY:-build/gpu_check-build.key}
ext_suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))" 2>/dev/null)
built_so="vit_kernels/_C${ext_suffix:-.so}"
sources_hash() {  # what _C is built from: settings, the CUTLASS version, the sources
  { printf '%s\n' "${arch_args[@]}" "$ext_suffix"
    # the CUTLASS version, not its folder: a prebuilt _C comes from another machine's path
    [ -n "${VIT_KERNELS_CUTLASS_DIR:-}" ] && grep -E "#define CUTLASS_(MAJOR|MINOR|PATCH) " \
      "$VIT_KERNELS_CUTLASS_DIR/include/cutlass/version.h" 2>/dev/null
    # the files in C order: a glob's order follows the locale, which differs between machines
    cat setup.py CMakeLists.txt $(printf '%s\n' csrc/* | LC_ALL=C sort); } | sha256sum | cut -d' ' -f1
}
build_key() {  # SOURCES_HASH: what _C was built from and what it is; "no _C" when this interpreter has none
  [ -f "$built_so" ] || { echo "no _C"; return; }
  { echo "$1"; cat "$built_so"; } | sha256sum | cut -d' ' -f1
}
# SOURCES_HASH, taken before the build: a source edited while the build ran may or may not be in the module, so
# no key is recorded then (it would name sources the module need not hold).
record_build_key() {
  local key
  if [ "$(sources_hash)" != "$1" ]; then
    echo "gpu_check.sh: setup.py, CMakeLists.txt or csrc/ changed during the build; no key recorded (build again)" >&2
    return 1
  fi
  key=$(build_key "$1")
  [ "$key" != "no _C" ] && mkdir -p "$(dirname "$build_key_file")" && echo "$key" >"$build_key_file"
}
build_cmd=(env VIT_KERNELS_BUILD_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "${arch_args[@]}"
  "$PY" -m pip install -e . --no-build-isolation --no-deps)
if [ -n "$record_build" ]; then  # build here for the GPU machine (no GPU needed) and record the key; nothing else
  [ -n "${fake[build]:-}" ] && build_cmd=(sleep "${fake[build]}")  # the tests' stand-in for the build
  sources_before=$(sources_hash)
  if ! "${build_cmd[@]}"; then
    echo "gpu_check.sh: the build failed" >&2
    exit 1
  fi
  if ! [ -f "$built_so" ]; then
    echo "gpu_check.sh: the build wrote no $built_so" >&2
    exit 1
  fi
  record_build_key "$sources_before" || exit 1
  echo "gpu_check: built $built_so for $record_build and recorded $build_key_file: carry both (README, GPU check)"
  exit 0
fi
if [ $no_build = 1 ]; then
  finish_stage build "skipped: $(wanted build && echo "--no-build" || echo "not in --only")"
elif wanted build && [ -s "$build_key_file" ] &&
  [ "$(cat "$build_key_file")" = "$(build_key "$(sources_hash)")" ] && "$PY" -c "import vit_kernels._C" 2>/dev/null; then
  finish_stage build "skipped: $built_so is built from these sources already ($build_key_file)"
else
  sources_before=$(sources_hash)
  if wanted build && [ -s "$build_key_file" ]; then  # say why a carried _C is not used: what went into the key
    echo "gpu_check: build key mismatch or _C does not import; key inputs: arch_args=${arch_args[*]:-none}" \
      "ext_suffix=$ext_suffix CUTLASS_DIR=${VIT_KERNELS_CUTLASS_DIR:-unset} sources=$sources_before" \
      "so_sha=$(sha256sum "$built_so" 2>/dev/null | cut -c1-16)" >&2
    "$PY" -c "import vit_kernels._C" 2>&1 | tail -n 2 >&2
  fi
  stage build 1 "${build_cmd[@]}"
  [ "${status[build]}" = ran:0 ] && record_build_key "$sources_before"
fi

# 2. what was built and what can run
stage info 0 bash -c 'nvidia-smi 2>/dev/null; "$0" -c "import json, vit_kernels as vk; print(json.dumps(vk.build_info(), indent=1))"' \
  "$PY"

# 3. smoke parity
# one process per (op, dtype), up to 9 at once: on a cold cache the Triton compiles take the time, one per process
stage smoke 1 "$PY" benchmarks/smoke_parity.py --json "$work/results/smoke_parity.json" --jobs $(($(nproc) < 9 ? $(nproc) : 9))

# 4. headline speed (measures the peaks the later tables reuse)
stage headline 1 "$PY" benchmarks/headline.py --out-dir "$work/results/headline" --peaks-json "$peaks"
peaks_arg=()
[ -s "$peaks" ] && peaks_arg=(--peaks "$peaks")

# 5. the tests that use CUDA, spread over the cores (Triton compiles in parallel)
# Every test file that runs kernels on the device (named, not grepped: the Triton tests take the device from the
# conftest fixture and never say "cuda"); CPU-only checks (static compiles, this script's own test) stay out.
gpu_tests=()
# The GEMM tests first (the kernels no GPU has run yet: Hopper TMA, CUTLASS, the cuda block ops), then the attention
# kernels a GPU has passed before: xdist hands tests out roughly in this order, so a stage cut at its slice has run
# the new ones.
for f in test_cuda_graphs test_tma_gemm test_cuda_linear test_block_fusion test_linear test_gelu test_attention test_cuda_attention \
  test_input_precision test_kernel_limits test_autocast test_dispatch test_empty_and_raw_ops test_vit test_compile \
  test_patch_zoo test_vit_timm test_vit_hf; do
  gpu_tests+=("tests/$f.py")
done
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n auto)
# -v: one line per finished test, so a run killed at its slice still shows what passed and what failed;
# VIT_KERNELS_FAILURES_LOG (tests/conftest.py): each failure's traceback as it happens, kept if the slice runs out
stage tests 1 env VIT_KERNELS_FAILURES_LOG="$work/test_failures.log" \
  "$PY" -m pytest -v -rfE -p no:cacheprovider "${xdist[@]}" --durations=10 \
  --junitxml="$work/results/pytest-gpu.xml" "${gpu_tests[@]}"

# 6. the tables (the attention and MLP torch.compile rows come later, in compile_tables: minutes of compilation)
# Each stage writes into its own folder: the benchmarks name their files by device, dtype and date only.
bench_args=(--no-progress "${peaks_arg[@]}")
stage attn_tables 1 "$PY" benchmarks/attn_bench.py "${bench_args[@]}" --out-dir "$work/results/attn_tables" --packed \
  --providers eager,sdpa_flash,sdpa_efficient,sdpa_cudnn,sdpa_math,triton,cuda
stage mlp_tables 1 "$PY" benchmarks/mlp_bench.py "${bench_args[@]}" --out-dir "$work/results/mlp_tables" \
  --providers eager,views,reference,triton,cuda
# ViT-B/16 alone, training and inference: each kernel backend of `vit`, and timm eager and under torch.compile (what
# a user would pick instead; the one compiled model, ~a minute per mode); vit:auto comes after auto_table (vit_auto).
# +graphs: the whole step replayed from a CUDA graph, the host's cost of issuing it gone (benchmarks/NOTES.md)
stage vit_tables 1 "$PY" benchmarks/vit_bench.py "${bench_args[@]}" --out-dir "$work/results/vit_tables" \
  --models vit_base_patch16_224 --compile yes \
  --providers vit:torch,vit:triton,vit:cuda,timm,timm+compile,vit:triton+graphs,vit:cuda+graphs,timm+graphs
stage block_tables 1 "$PY" benchmarks/block_bench.py "${bench_args[@]}" --out-dir "$work/results/block_tables" \
  --providers eager,compile,unfused,fused,unfused_cuda,fused_cuda

# 6b. Nsight Compute on one fwd + bwd of each op and backend at ViT-B/16: per launch, time, DRAM / SM throughput,
# occupancy, waves per SM (benchmarks/profile_kernels.py; the raw CSV lands in the tarball)
ncu=$(cuda_tool ncu)
if [ -n "$ncu" ] || [ $has_gpu = 0 ] || [ -n "${fake[profile]:-}" ]; then
  stage profile 1 bash -c "\"\$0\" --profile-from-start off --csv --page details --section SpeedOfLight \
    --section Occupancy --section LaunchStats --log-file \"\$2/ncu.csv\" \"\$1\" benchmarks/profile_kernels.py \
    && \"\$1\" benchmarks/profile_kernels.py --digest \"\$2/ncu.csv\"" "$ncu" "$PY" "$work/results"
else
  optional profile "ncu (Nsight Compute) not found (PATH, /usr/local/cuda/bin)"
fi

# 6c. the Hopper GEMMs against the pointer kernel and cuBLAS, product by product and op by op (NOTES.md, 2026-12-03)
stage gemm_ab 1 "$PY" benchmarks/probe_gemm.py --variants "${peaks_arg[@]}"

# 7. the pytest-benchmark suite: the JSON a later run is compared with (pytest-benchmark compare)
# (without a GPU the stage reports "no CUDA device" whatever is installed, like every GPU stage)
if [ $has_gpu = 0 ] || "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  stage pytest_bench 1 "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$work/results/pytest-benchmark.json"
else
  optional pytest_bench "pytest-benchmark is not installed"
fi

# 8. compute-sanitizer on a small script: every kernel backend, fwd and bwd, shapes whose kernels smoke compiled
sanitizer=$(cuda_tool compute-sanitizer)
cat >"$work/sanitize_me.py" <<'EOF'
import torch
import vit_kernels as vk

backends = [b for b in vk.available_backends("cuda") if b in ("triton", "cuda")]
print("kernel backends:", backends, flush=True)
for backend in backends:
    for dtype in (torch.bfloat16, torch.float16):
        for B, H, N, D in ((1, 2, 197, 64), (1, 2, 257, 80), (1, 1, 1, 64)):
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            out = vk.attention(q, k, v, backend=backend)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"done: attention {backend} {dtype} B={B} H={H} N={N} D={D}", flush=True)
        x = torch.randn(1, 197, 768, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(3 * 768, 768, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(3 * 768, device="cuda", dtype=dtype, requires_grad=True)
        qkv = vk.fused_qkv(x, w, b, 12, backend=backend)
        torch.autograd.grad(qkv, (x, w, b), [torch.randn_like(t) for t in qkv])
        w1 = torch.randn(3072, 768, device="cuda", dtype=dtype, requires_grad=True)
        w2 = torch.randn(768, 3072, device="cuda", dtype=dtype, requires_grad=True)
        y = vk.gelu_mlp(x, w1, None, w2, None, backend=backend)
        torch.autograd.grad(y, (x, w1, w2), torch.randn_like(y))
        torch.cuda.synchronize()
        print(f"done: fused_qkv, gelu_mlp {backend} {dtype}", flush=True)  # a killed run says how far it got
        # the block ops: LayerNorm before the GEMMs, the residual in proj's and fc2's epilogues
        ln_w, ln_b = (torch.randn(768, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        qkv = vk.ln_fused_qkv(x, ln_w, ln_b, 1e-6, w, b, 12, backend=backend)
        torch.autograd.grad(qkv, (x, ln_w, ln_b, w, b), [torch.randn_like(t) for t in qkv])
        o = torch.randn_like(x, requires_grad=True)
        wp = torch.randn(768, 768, device="cuda", dtype=dtype, requires_grad=True)
        y = vk.proj_residual(o, wp, b[:768].detach(), x, backend=backend)
        torch.autograd.grad(y, (o, wp, x), torch.randn_like(y))
        y = vk.ln_gelu_mlp(x, ln_w, ln_b, 1e-6, w1, None, w2, None, backend=backend)
        torch.autograd.grad(y, (x, ln_w, ln_b, w1, w2), torch.randn_like(y))
        torch.cuda.synchronize()
        print(f"done: ln_fused_qkv, proj_residual, ln_gelu_mlp {backend} {dtype}", flush=True)
torch.cuda.synchronize()
print("ok")
EOF
if [ -n "$sanitizer" ] || [ $has_gpu = 0 ] || [ -n "${fake[memcheck]:-}${fake[racecheck]:-}" ]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds
  # accesses that would otherwise land inside a neighbouring cached block.
  stage memcheck 1 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
    "$PY" "$work/sanitize_me.py"
  stage racecheck 1 "$sanitizer" --tool racecheck --error-exitcode 1 "$PY" "$work/sanitize_me.py"
else
  optional memcheck "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  optional racecheck "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
fi

# 9. the attention launch table's tuner, at the two shapes that matter most
# (--no-static: compiling every candidate for the spill check took the whole 53 s slice on the H200; each
# timed candidate is logged as it goes, so a killed run still reports what it timed)
stage tune 1 "$PY" benchmarks/tune_attention.py --no-progress --no-static --out-dir "$work/results/tune" \
  --shapes "256,12,197,64;196,16,257,80"

# 10. torch.compile: the baseline users will ask about, last because it compiles for minutes
stage compile_tables 1 bash -c '"$0" benchmarks/attn_bench.py "${@:2}" --out-dir "$1" --packed --shapes 256,12,197,64 \
  --providers eager,compile && "$0" benchmarks/mlp_bench.py "${@:2}" --out-dir "$1" --providers eager,compile' \
  "$PY" "$work/results/compile_tables" "${bench_args[@]}"

# 11. proposed entries for backend="auto"'s table, from the attention, GEMM and block tables' JSON above (not
# headline's: its shapes are named "custom", a second case of a table shape, and its mlp run has no `views`, the
# fused_qkv baseline)
mapfile -t bench_json < <(ls "$work"/results/{attn_tables,mlp_tables,block_tables}/{attn,mlp,block}_bench-*.json \
  2>/dev/null)
# A run without attn_tables (README's lease plan) takes the attention cells from this GPU's newest committed table,
# so that the proposal keeps them
if [ ${#bench_json[@]} -gt 0 ] && ! ls "$work"/results/attn_tables/attn_bench-*.json >/dev/null 2>&1; then
  committed_attn=$(ls benchmarks/results/attn_bench-"$slug"-bf16-2*.json 2>/dev/null | sort | tail -n 1)
  [ -n "$committed_attn" ] && bench_json+=("$committed_attn")
fi
if [ ${#bench_json[@]} -eq 0 ] && [ -z "${fake[auto_table]:-}" ]; then
  if [ $has_gpu = 0 ] && wanted auto_table; then
    finish_stage auto_table "$no_gpu_status"  # its inputs are the GPU stages' tables
  else
    optional auto_table "no benchmark results to read"
  fi
else
  stage auto_table 0 "$PY" benchmarks/auto_table.py "${bench_json[@]}" --out "$work/results/auto_table.json"
fi

# 12. ViT-B/16 on `auto` with the table auto_table just proposed (VIT_KERNELS_MEASURED_TABLE): what a user gets
# once it is committed, in the same run as the vit_tables rows it is compared with
proposed="$work/results/auto_table.json"
if [ -s "$proposed" ] || [ $has_gpu = 0 ] || [ -n "${fake[vit_auto]:-}" ]; then
  stage vit_auto 1 env VIT_KERNELS_MEASURED_TABLE="$proposed" "$PY" benchmarks/vit_bench.py "${bench_args[@]}" \
    --out-dir "$work/results/vit_auto" --models vit_base_patch16_224 --compile no --providers vit:auto
else
  optional vit_auto "auto_table proposed no table to run it with"
fi

# ---------------------------------------------------------------------------------------------------
echo
echo "gpu_check: $(( $(date +%s) - start )) s of a $budget s budget"
echo "gpu_check: report $report"
echo "gpu_check: logs $logs_dir/$tarball"
[ -n "$out" ] && echo "gpu_check: $out holds $(basename "$report") and $tarball"
[ -n "$probe_error" ] && echo "gpu_check: the device probe FAILED: $probe_error"
# The essentials once more at the very end of stdout, for when only the output's tail comes back.
if [ -s "$work/smoke.log" ]; then
  echo
  grep -E " (FAIL|ERROR) |^smoke parity" "$work/smoke.log" | tail -n 40
fi
if [ -s "$work/headline.log" ]; then
  echo
  sed -n '/^## headline: /,$p' "$work/headline.log"
fi
echo
bad=0
[ -n "$probe_error" ] && bad=1
for s in "${STAGES[@]}"; do
  echo "- $s: $(stage_line "$s")"
  case ${status[$s]:-} in ran:0 | skipped:*) ;; *) bad=1 ;; esac
done
exit $bad
