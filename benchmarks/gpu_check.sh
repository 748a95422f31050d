#!/usr/bin/env bash
# One command for a GPU machine with no network access:
#   build -> full test suite -> measured peaks -> every benchmark -> compute-sanitizer -> report.
# Writes benchmarks/results/<gpu-name>-<date>.md (plus each benchmark's CSV/JSON/PNG beside it), and
# copies all of it to $OUT when that is set. Every step runs even if an earlier one failed; the exit
# status is non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh                # PYTHON=/path/to/python to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()

gpu_name=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
slug=$(echo "$gpu_name" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
stamp=$(date +%Y-%m-%d)
report="$RESULTS/$slug-$stamp.md"

# step NAME CMD...: run, keep the full log in $work/NAME.log, echo it, remember failures.
step() {
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$work/all.log"
  local start=$(date +%s)
  "$@" >"$work/$name.log" 2>&1
  local rc=$?
  cat "$work/$name.log" >>"$work/all.log"
  tail -n 40 "$work/$name.log"
  echo "=== $name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$work/all.log"
  echo "$rc" >"$work/$name.rc"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
  return 0
}

# 1. build (no network: the build requirements must already be installed)
export VIT_KERNELS_BUILD_CUDA=1
step build "$PY" -m pip install -e . --no-build-isolation --no-deps
step build_info "$PY" -c "import json, vit_kernels as vk; print(json.dumps(vk.build_info(), indent=1))"

# 2. the whole test suite
step tests "$PY" -m pytest -q

# 3. measured peaks (copy bandwidth, bf16/fp16/fp32 matmul), reused by every benchmark below
step peaks "$PY" benchmarks/common.py --json "$work/peaks.json"
peaks_arg=()
[ -s "$work/peaks.json" ] && peaks_arg=(--peaks "$work/peaks.json")

# 4. benchmarks (stdout holds the Markdown tables; CSV/JSON/PNG go to benchmarks/results/)
step attn_bench "$PY" benchmarks/attn_bench.py --no-progress --plot "${peaks_arg[@]}"
step attn_bench_fp16_packed "$PY" benchmarks/attn_bench.py --no-progress --dtype fp16 --packed --mode fwd "${peaks_arg[@]}"
step mlp_bench "$PY" benchmarks/mlp_bench.py --no-progress "${peaks_arg[@]}"
step vit_bench "$PY" benchmarks/vit_bench.py --no-progress "${peaks_arg[@]}"
step kernel_report "$PY" benchmarks/kernel_report.py --json "$RESULTS/kernel_report-$slug-$stamp.json"
step tune_attention "$PY" benchmarks/tune_attention.py --no-progress "${peaks_arg[@]}"

# 5. compute-sanitizer on a small attention + GEMM script, every kernel backend, fwd and bwd
sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
cat >"$work/sanitize_me.py" <<'EOF'
import torch
import vit_kernels as vk

backends = [b for b in vk.available_backends("cuda") if b in ("triton", "cuda")]
print("kernel backends:", backends)
for backend in backends:
    for dtype in (torch.float16, torch.bfloat16):
        for B, H, N, D in ((2, 3, 197, 64), (1, 2, 257, 80), (1, 1, 1, 32)):
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            out = vk.attention(q, k, v, backend=backend)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        x = torch.randn(2, 197, 192, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(576, 192, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(576, device="cuda", dtype=dtype, requires_grad=True)
        qkv = vk.fused_qkv(x, w, b, 3, backend=backend)
        torch.autograd.grad(qkv, (x, w, b), [torch.randn_like(t) for t in qkv])
        w1 = torch.randn(768, 192, device="cuda", dtype=dtype, requires_grad=True)
        w2 = torch.randn(192, 768, device="cuda", dtype=dtype, requires_grad=True)
        y = vk.gelu_mlp(x, w1, None, w2, None, backend=backend)
        torch.autograd.grad(y, (x, w1, w2), torch.randn_like(y))
torch.cuda.synchronize()
print("ok")
EOF
if [ -n "$sanitizer" ]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds
  # accesses that would otherwise land inside a neighbouring cached block.
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" "$work/sanitize_me.py"
  step racecheck "$sanitizer" --tool racecheck --error-exitcode 1 "$PY" "$work/sanitize_me.py"
else
  echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): memcheck/racecheck skipped" | tee "$work/memcheck.log"
fi

# 6. the report
{
  echo "# GPU check: $gpu_name, $stamp"
  echo
  echo "- commit: $(git rev-parse HEAD 2>/dev/null)$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (dirty)')"
  echo "- host: $(hostname), $(nproc) CPU cores"
  echo "- python: $($PY --version 2>&1); $($PY -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' 2>&1)"
  echo "- driver: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- nvcc: $( (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null) | tail -1)"
  if [ ${#failed[@]} -eq 0 ]; then echo "- all steps passed"; else echo "- FAILED steps: ${failed[*]}"; fi
  echo
  echo "## Tests"
  echo '```'
  grep -E "passed|failed|error|skipped" "$work/tests.log" | tail -n 15
  echo '```'
  echo
  echo "## Build info"
  echo '```'
  cat "$work/build_info.log"
  echo '```'
  echo
  echo "## Measured peaks"
  echo '```'
  cat "$work/peaks.log"
  echo '```'
  for b in attn_bench attn_bench_fp16_packed mlp_bench vit_bench kernel_report tune_attention; do
    echo
    echo "## $b (exit $(cat "$work/$b.rc" 2>/dev/null || echo '?'))"
    echo
    # the Markdown the script printed, minus progress and "wrote" lines
    grep -vE "^(wrote |=== )" "$work/$b.log"
  done
  echo
  echo "## compute-sanitizer"
  echo '```'
  for t in memcheck racecheck; do [ -f "$work/$t.log" ] && { echo "[$t]"; tail -n 15 "$work/$t.log"; }; done
  echo '```'
} >"$report"
cp "$work/all.log" "$RESULTS/$slug-$stamp.log"
echo "wrote $report"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$report" "$RESULTS/$slug-$stamp.log" "$OUT/"
  find "$RESULTS" -newer "$work/build.rc" -type f -exec cp {} "$OUT/" \; 2>/dev/null
  echo "copied the report and results to $OUT"
fi

if [ ${#failed[@]} -ne 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
