#!/usr/bin/env bash
# Everything a lent GPU machine is needed for, in one call: build the CUDA extension, validate the
# ops, run the CUDA tests and the GPU benchmarks.
#
# Results go to $OUT when it is set (the device machine), else to
# benchmarks/results/<device>-<date>/: summary.txt (one line per step: exit code, seconds), one
# JSON per benchmark and logs.tar.gz (every step's log). That is 7 files at most, so they all come
# back from a device run, and logs.tar.gz is rewritten after every step, so a run stopped at its
# time limit still returns what it did.
#
# Steps run in order of value, each even if an earlier one failed (except after a failed build),
# within a time budget: SUITE_BUDGET_S seconds in all (default 540, inside a 600 s run limit);
# a step is cut at the budget's end, and one that cannot start with MIN_STEP_S seconds left is
# skipped. SUITE_STEPS="build e2e_7b_b1 ..." runs only the steps named (without build, the
# extension already built in place is used).
# The script exits non-zero if any step failed, was cut or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-540}
MIN_STEP_S=${MIN_STEP_S:-20}
ALL_STEPS="environment build validate tests e2e_7b_b1 bench_kernels e2e_7b_b8 bench_distill_7b bench_distill_tiny ctest"
STEPS=${SUITE_STEPS:-$ALL_STEPS}
for name in $STEPS; do  # a typo in SUITE_STEPS must not cost a device run
    case " $ALL_STEPS " in *" $name "*) ;; *) echo "unknown step '$name'; the steps are: $ALL_STEPS" >&2; exit 2 ;; esac
done
device_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr ' ' '-' || true)
RESULTS=${OUT:-benchmarks/results/${device_name:-unknown-gpu}-$(date +%Y-%m-%d)}
mkdir -p "$RESULTS"
summary="$RESULTS/summary.txt"
: > "$summary"
failed=0
began=$SECONDS

record() {  # record NAME RC SECONDS WHAT
    printf '%-18s rc=%-7s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"
}

step() {  # step NAME COMMAND...: run COMMAND within the budget, log it, record its exit code;
          # returns non-zero when the step failed, was cut or was skipped
    local name=$1; shift
    local left=$((BUDGET - (SECONDS - began)))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        record "$name" skipped 0 "no time left in the ${BUDGET}s budget"
        failed=1
        return 1
    fi
    local start=$SECONDS
    echo "== $name (${left}s left): $*"
    timeout --kill-after=10 "$left" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    [ "$rc" -eq 124 ] && rc=cut
    record "$name" "$rc" "$((SECONDS - start))" "$*"
    tar -czf "$RESULTS/logs.tar.gz" -C "$LOGS" .
    [ "$rc" = 0 ] || { failed=1; return 1; }
}

run_step() {
    case $1 in
    environment)
        step environment bash -c "nvidia-smi; nvcc --version; $PYTHON -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)'" ;;
    build)
        step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
            "$PYTHON" setup.py build_ext --inplace ;;
    validate)
        step validate "$PYTHON" -m sdrpn.ops.validate --device cuda ;;
    tests)  # the test files with CUDA cases: every op against its reference, the engine's hot path
        step tests "$PYTHON" -m pytest -q -n 8 tests/test_ops_backends.py tests/test_ops_compile.py \
            tests/test_ops_errors.py tests/test_ops_fuzz.py tests/test_ops_reference.py tests/test_engine.py \
            tests/test_validate.py ;;
    e2e_7b_b1 | e2e_7b_b8)  # LLaVA-1.5-7B, random weights: the cost depends on the shapes only
        step "$1" "$PYTHON" benchmarks/bench_e2e.py --arch llava-1.5-7b --random-weights \
            --device cuda --dtype bfloat16 --batch "${1##*_b}" --new-tokens 32 --roi-fraction 0.25 \
            --methods baseline,sdrpn,sdrpn-reference,sdrpn-compiled,res-scaling,vicrop \
            --json "$RESULTS/$1.json" ;;
    bench_kernels)
        step bench_kernels "$PYTHON" benchmarks/bench_kernels.py --device cuda --json "$RESULTS/bench_kernels.json" ;;
    bench_distill_7b)
        step bench_distill_7b "$PYTHON" benchmarks/bench_distill.py --device cuda --arch llava-1.5-7b \
            --repeats 3 --json "$RESULTS/bench_distill_7b.json" ;;
    bench_distill_tiny)
        step bench_distill_tiny "$PYTHON" benchmarks/bench_distill.py --device cuda --arch tiny \
            --json "$RESULTS/bench_distill_tiny.json" ;;
    ctest)  # the raw kernels without torch: every CUDA kernel against its CPU twin
        step ctest bash -c "cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build/cmake-gpu -j16 && ctest --test-dir build/cmake-gpu --output-on-failure" ;;
    esac
}

LOGS=$(mktemp -d)
build_failed=0
for name in $STEPS; do
    if [ "$build_failed" = 1 ] && [ "$name" != environment ]; then
        record "$name" skipped 0 "the build failed"
        continue
    fi
    run_step "$name" || { [ "$name" = build ] && build_failed=1; }
done
echo "== summary ($RESULTS, $((SECONDS - began))s)"
cat "$summary"
rm -rf "$LOGS"
exit "$failed"
