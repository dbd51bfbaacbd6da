#!/usr/bin/env bash
# Everything a session with a lent NVIDIA GPU (H100/H200) checks for the GPU backends, in one call (~8 minutes):
#
#     bash benchmarks/gpu_session.sh [--dry-run] [env|tests|tune|bench|all]      (default: all)
#
# - env:   versions and the GPU (torch, triton, device name, SMs, shared memory per block);
# - tests: the GPU correctness matrix of triton (tests/test_triton_gpu.py), sdpa and flex (tests/test_engines_gpu.py)
#          against the float64 oracle, the backends' own tests and the library end to end on CUDA
#          (tests/test_device_paths.py), in parallel processes (pytest-xdist, when installed);
# - tune:  `selfattn tune --device cuda` (bf16, N 2k and 8k): the automatic choice's table for this GPU, written
#          into src/selfattn/backends/tables/ (commit it: it ships with the package);
# - bench: benchmarks/bench_gpu.py --quick (D = 128, N 2k and 8k, causal and not, forward and backward: the Triton
#          kernels against every torch SDPA backend and FlexAttention, TFLOP/s) and benchmarks/bench_gpu_choice.py
#          --quick (the automatic choice against SDPA and Flex on causal / documents / window / soft-cap / dropout).
#
# --dry-run runs every step but the CUDA ones, on the CPU: the environment report, the GPU tests' collection, a
# one-size tune into $OUT, and bench_gpu_choice.py --dry-run. tests/test_gpu_session.py runs it in the suite, so
# the script cannot rot while no GPU is lent.
#
# It installs nothing: it uses the machine's python3 (PyTorch and Triton preinstalled) with PYTHONPATH=src.
# Every phase has its own time limit (TESTS_TIMEOUT, TUNE_TIMEOUT, BENCH_TIMEOUT, CHOICE_TIMEOUT seconds), so one slow phase cannot eat the
# others. Logs and results go to $OUT when it is set (the device tool brings that folder back), else to
# benchmarks/results/. The script prints a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}
what=${1:-all}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
summary=()

phase() { [[ $what == all || $what == "$1" ]]; }

if phase env || phase tests || phase tune || phase bench; then
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

gpu_tests=(tests/test_triton_gpu.py tests/test_engines_gpu.py tests/test_triton_backend.py tests/test_device_paths.py)

if phase tests && [[ $dry == 1 ]]; then
    "$py" -m pytest -q -p no:cacheprovider --collect-only "${gpu_tests[@]}" > "$out/gpu-tests-collect.log" 2>&1
    rc=$?
    summary+=("tests (dry run: collected only): exit $rc, $(tail -1 "$out/gpu-tests-collect.log")")
elif phase tests; then
    workers=()
    if "$py" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-8}"); fi
    start=$SECONDS
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout "${TESTS_TIMEOUT:-150}" "$py" -m pytest -q -p no:cacheprovider "${workers[@]}" -rfE \
        "${gpu_tests[@]}" 2>&1 | tee "$out/gpu-tests.log"
    rc=${PIPESTATUS[0]}
    summary+=("tests: exit $rc in $((SECONDS - start)) s: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu-tests.log" | tail -1)")
fi

if phase tune; then
    start=$SECONDS
    if [[ $dry == 1 ]]; then
        "$py" -m selfattn tune --quick --workloads causal,decode --out "$out/tune-dry-run.json" > "$out/gpu-tune.log" 2>&1
        rc=$?
    else  # into the package's shipped tables: commit the file it names
        table=$("$py" -c "from selfattn import tune; from selfattn.backends import choice; print(choice.SHIPPED_DIR / tune.table_filename({'device': choice.device_name('cuda'), 'torch': choice.torch_version()}))")
        timeout "${TUNE_TIMEOUT:-120}" "$py" -m selfattn tune --device cuda --sizes 2048,8192 --rounds 3 \
            --dtypes bfloat16 --out "$table" 2>&1 | tee "$out/gpu-tune.log"
        rc=${PIPESTATUS[0]}
        [[ -f $table ]] && cp "$table" "$out/"
    fi
    summary+=("tune: exit $rc in $((SECONDS - start)) s")
fi

if phase bench; then
    start=$SECONDS
    if [[ $dry == 1 ]]; then
        "$py" benchmarks/bench_gpu_choice.py --dry-run --out "$out" > "$out/gpu-bench.log" 2>&1
        rc=$?
    else
        timeout "${BENCH_TIMEOUT:-90}" "$py" benchmarks/bench_gpu.py --quick --out "$out" ${BENCH_ARGS:-} 2>&1 \
            | tee "$out/gpu-bench.log"
        rc=${PIPESTATUS[0]}
        timeout "${CHOICE_TIMEOUT:-90}" "$py" benchmarks/bench_gpu_choice.py --quick --out "$out" 2>&1 \
            | tee -a "$out/gpu-bench.log"
        rc=$((rc | PIPESTATUS[0]))
    fi
    summary+=("bench: exit $rc in $((SECONDS - start)) s")
fi

echo
echo "== summary =="
cat "$out/gpu-env.txt" 2>/dev/null
for line in "${summary[@]}"; do echo "$line"; done
ls -1 "$out"/*.md 2>/dev/null | while read -r f; do echo; cat "$f"; done
