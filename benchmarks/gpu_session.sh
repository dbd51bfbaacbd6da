#!/usr/bin/env bash
# Everything a session with a lent NVIDIA GPU (H100/H200) checks for the Triton backend, in one call:
#
#     bash benchmarks/gpu_session.sh [env|tests|bench|all]      (default: all)
#
# - env:   versions and the GPU (torch, triton, device name, SMs, shared memory per block);
# - tests: the GPU correctness matrix (tests/test_triton_gpu.py), the backend's own tests and the library end to end
#          on CUDA (tests/test_device_paths.py: modules, GPT, decoding, compile, Hugging Face), in parallel
#          processes (pytest-xdist, when installed) so that Triton compiles the kernel variants side by side;
# - bench: benchmarks/bench_gpu.py --quick (the issue's target shapes: D = 128, N 2k and 8k, causal and not,
#          forward and backward; selfattn against every torch SDPA backend and FlexAttention, autotuned).
#
# It installs nothing: it uses the machine's python3 (PyTorch and Triton preinstalled) with PYTHONPATH=src.
# Every phase has its own time limit (TESTS_TIMEOUT, BENCH_TIMEOUT seconds), so one slow phase cannot eat the
# others. Logs and results go to $OUT when it is set (the device tool brings that folder back), else to
# benchmarks/results/. The script prints a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
what=${1:-all}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
summary=()

phase() { [[ $what == all || $what == "$1" ]]; }

if phase env || phase tests || phase bench; then
    "$py" - <<'EOF' 2>&1 | tee "$out/gpu-env.txt"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, end=" | ")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"shared memory per block (opt-in) {getattr(p, 'shared_memory_per_block_optin', '?')} B")
else:
    print("no CUDA GPU visible")
EOF
fi

if phase tests; then
    workers=()
    if "$py" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
    start=$SECONDS
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout "${TESTS_TIMEOUT:-300}" "$py" -m pytest -q -p no:cacheprovider "${workers[@]}" -rfE \
        tests/test_triton_gpu.py tests/test_triton_backend.py tests/test_device_paths.py 2>&1 | tee "$out/gpu-tests.log"
    rc=${PIPESTATUS[0]}
    summary+=("tests: exit $rc in $((SECONDS - start)) s: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu-tests.log" | tail -1)")
fi

if phase bench; then
    start=$SECONDS
    timeout "${BENCH_TIMEOUT:-360}" "$py" benchmarks/bench_gpu.py --quick --out "$out" ${BENCH_ARGS:-} 2>&1 \
        | tee "$out/gpu-bench.log"
    rc=${PIPESTATUS[0]}
    summary+=("bench: exit $rc in $((SECONDS - start)) s")
fi

echo
echo "== summary =="
cat "$out/gpu-env.txt" 2>/dev/null
for line in "${summary[@]}"; do echo "$line"; done
ls -1 "$out"/*.md 2>/dev/null | while read -r f; do echo; cat "$f"; done
