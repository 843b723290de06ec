#!/usr/bin/env bash
# Everything a lent GPU machine is needed for, in one call: build the CUDA extension, validate the
# ops, run the CUDA tests and the GPU benchmarks.
#
# It runs on the machine's preinstalled Python as it is: nothing can be installed there and there is
# no network. So sdrpn is used from this checkout (PYTHONPATH), not installed; pytest runs in
# parallel only where pytest-xdist is importable; without cmake, ctest is recorded as absent (which
# does not fail the run).
#
# Results go to $OUT when it is set (the device machine), else to
# benchmarks/results/<device>-<date>/: summary.txt (one line per step: exit code, seconds),
# NOTES.md (the GPU targets, for whoever reads the run to fill in), one JSON per benchmark, except
# that the Qwen e2e steps share e2e_qwen.json (one run per step, under the step's name), and
# logs.tar.gz (every step's log). That is 9 files; keep it at 10 at most, so that they all come
# back from a device run. logs.tar.gz is rewritten after every step, so a run stopped at its time
# limit still returns what it did.
#
# Steps run in order of value, each even if an earlier one failed (except after a failed build),
# within a time budget: SUITE_BUDGET_S seconds for the whole script (default 555, inside a 600 s
# run limit that counts the machine's start-up outside it). A step is cut TAIL_S seconds (default
# 10) before the budget's end, which leaves time for a cut step to die and for the closing summary;
# a step that cannot start with MIN_STEP_S seconds left is skipped. SUITE_STEPS="build e2e_7b_b1 ..."
# runs only the steps named (without build, the extension already built in place is used).
# The script exits non-zero if any step failed, was cut or was skipped.
#
# SUITE_DRY_RUN=1 checks every step's command line on any machine, in seconds, instead of running
# it: python scripts run up to the end of their argument parsing (setup.py up to its commands),
# bench_e2e.py validates its arguments (--check-args), pytest only collects, ctest looks for cmake.
set -uo pipefail
cd "$(dirname "$0")/.."
began=$SECONDS

first_python_with_torch() {  # python3 is not always the interpreter that has the packages
    local candidate
    for candidate in python3 python; do
        "$candidate" -c "import torch" > /dev/null 2>&1 && { echo "$candidate"; return; }
    done
    echo python3
}

PYTHON=${PYTHON:-$(first_python_with_torch)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts under benchmarks/ import sdrpn from here
BUDGET=${SUITE_BUDGET_S:-555}
TAIL_S=${TAIL_S:-10}
MIN_STEP_S=${MIN_STEP_S:-20}
DRY_RUN=${SUITE_DRY_RUN:-0}
# New model families' e2e benchmarks (random weights) join after e2e_7b_b8 as their bench_e2e.py
# archs land, one step per batch size. A JSON each would have passed the 10-file limit above with
# Qwen3-VL, so the Qwen steps (Qwen2.5-VL 7B at batch 1 and 8, Qwen3-VL 4B at batch 8) write into
# one e2e_qwen.json, keyed by step: later Qwen sizes or batches cost no file.
ALL_STEPS="environment build validate tests e2e_7b_b1 e2e_7b_b8 e2e_qwen7b_b1 e2e_qwen7b_b8 e2e_qwen3_4b_b8 bench_kernels bench_distill_7b bench_distill_tiny ctest"
STEPS=${SUITE_STEPS:-$ALL_STEPS}
for name in $STEPS; do  # a typo in SUITE_STEPS must not cost a device run
    case " $ALL_STEPS " in *" $name "*) ;; *) echo "unknown step '$name'; the steps are: $ALL_STEPS" >&2; exit 2 ;; esac
done
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
device_slug=${device//[^A-Za-z0-9._-]/-}
RESULTS=${OUT:-benchmarks/results/${device_slug:-unknown-gpu}-$(date +%Y-%m-%d)}
mkdir -p "$RESULTS"
summary="$RESULTS/summary.txt"
: > "$summary"
rm -f "$RESULTS/e2e_qwen.json"  # the Qwen steps add their runs to it: none from an earlier suite run
failed=0
WORK=$(mktemp -d)
LOGS="$WORK/logs"
mkdir "$LOGS"
trap 'rm -rf "$WORK"' EXIT

# A dry run's python: runs a script (or `-m module`) as python would, and stops it once its command
# line is parsed: where argparse's parse_args returns, or where setup.py's commands would start.
STOP_AFTER_PARSING="$WORK/stop_after_parsing.py"
cat > "$STOP_AFTER_PARSING" <<'EOF'
import argparse, os, runpy, sys

def stop(*_):
    print("command line parsed:", *sys.argv)
    raise SystemExit(0)

def parse_args_then_stop(parser, *args, **kwargs):
    parse_args(parser, *args, **kwargs)
    stop()

parse_args, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, parse_args_then_stop
target, *arguments = sys.argv[1:]
if target == "-m":
    sys.argv, sys.path[0] = arguments, os.getcwd()
    runpy.run_module(arguments[0], run_name="__main__", alter_sys=True)
else:
    if os.path.basename(target) == "setup.py":
        import setuptools.dist
        setuptools.dist.Distribution.run_commands = stop
    sys.argv, sys.path[0] = [target, *arguments], os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
EOF

record() {  # record NAME RC SECONDS WHAT
    printf '%-18s rc=%-7s %4ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"
}

step() {  # step NAME COMMAND...: run COMMAND within the budget, log it, record its exit code;
          # returns non-zero when the step failed, was cut or was skipped
    local name=$1; shift
    local left=$((BUDGET - TAIL_S - (SECONDS - began)))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        record "$name" skipped 0 "no time left in the ${BUDGET}s budget"
        failed=1
        return 1
    fi
    local start=$SECONDS
    echo "== $name (${left}s left): $*"
    timeout --kill-after=5 "$left" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    case $rc in 124 | 137) rc=cut ;; esac
    record "$name" "$rc" "$((SECONDS - start))" "$*"
    tar -czf "$RESULTS/logs.tar.gz" -C "$LOGS" .
    [ "$rc" = 0 ] || { failed=1; return 1; }
}

python_command() {  # python_command CHECK ARGS...: sets COMMAND to `$PYTHON ARGS...`; in a dry run
                    # CHECK is appended instead (a script's own check flag), or, when CHECK is
                    # "parse", the script stops after parsing its command line
    local check=$1; shift
    if [ "$DRY_RUN" != 1 ]; then
        COMMAND=("$PYTHON" "$@")
    elif [ "$check" = parse ]; then
        COMMAND=("$PYTHON" "$STOP_AFTER_PARSING" "$@")
    else
        COMMAND=("$PYTHON" "$@" "$check")
    fi
}

environment_report() {  # what the steps rely on; fails only when torch or transformers cannot load
    nvidia-smi
    nvcc --version
    echo "cmake: $(command -v cmake || echo absent)"
    "$PYTHON" - <<'EOF'
import importlib.util, pathlib, sys
import torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      "GPU", torch.cuda.is_available(), "transformers", transformers.__version__)
optional = ["xdist", "setuptools", "hypothesis", "skimage", "ninja", "pybind11", "matplotlib"]
print("importable:", ", ".join(f"{name} {importlib.util.find_spec(name) is not None}" for name in optional))
try:
    from torch.utils.cpp_extension import CUDA_HOME  # what the build compiles against
except ImportError as error:
    print("torch.utils.cpp_extension:", error)
else:
    libraries = ("cublas", "cusparse", "cufft", "curand", "cusolver")
    headers = sorted(path.name for path in pathlib.Path(CUDA_HOME or "/nonexistent", "include").glob("cu*.h")
                     if path.name.startswith(libraries))
    print("CUDA_HOME", CUDA_HOME, "library headers:", " ".join(headers) or "none")
EOF
}

run_step() {
    case $1 in
    environment)  # the same in a dry run: it only reads
        export -f environment_report
        step environment env PYTHON="$PYTHON" bash -c environment_report ;;
    build)
        python_command parse setup.py build_ext --inplace
        step build env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" \
            "${COMMAND[@]}" ;;
    validate)
        python_command parse -m sdrpn.ops.validate --device cuda
        step validate "${COMMAND[@]}" ;;
    tests)  # the test files with CUDA cases: every op against its reference, the engine's hot path
        local parallel="" require=1  # a broken build must fail the CUDA cases, not skip them
        "$PYTHON" -c "import xdist" > /dev/null 2>&1 && parallel="-n 8"
        [ "$DRY_RUN" = 1 ] && require=0  # a dry run builds nothing
        # Only the CUDA cases (their ids name cuda): the CPU ones passed in CI, and the budget is short.
        python_command --collect-only -m pytest -q $parallel -k "cuda or gpu" tests/test_ops_backends.py \
            tests/test_ops_compile.py tests/test_ops_errors.py tests/test_ops_fuzz.py tests/test_ops_reference.py \
            tests/test_engine.py tests/test_validate.py tests/test_roi.py tests/test_authors_rules.py
        step tests env SDRPN_REQUIRE_EXTENSION=$require "${COMMAND[@]}" ;;
    e2e_7b_b1 | e2e_7b_b8)
        # LLaVA-1.5-7B, random weights: the cost depends on the shapes only. The sdrpn engine both
        # ways (sync-free and trimmed) at three RoIs: box upscaling (every RoI slot holds a token),
        # masked upscaling (about 28% of them do) and no RoI. sdrpn-reference runs sample by
        # sample, so at batch 8 it would only repeat batch 1 eight times: batch 1 measures it.
        local batch=${1##*_b} methods=baseline,sdrpn
        [ "$batch" = 1 ] && methods+=,sdrpn-reference
        python_command --check-args benchmarks/bench_e2e.py --arch llava-1.5-7b --random-weights \
            --device cuda --dtype bfloat16 --batch "$batch" --new-tokens 16 --warmup 1 --repeats 3 \
            --rois box:0.25,masked:0.3,none --methods "$methods" --json "$RESULTS/$1.json"
        step "$1" "${COMMAND[@]}" ;;
    e2e_qwen7b_b1 | e2e_qwen7b_b8 | e2e_qwen3_4b_b8)
        # Qwen2.5-VL-7B (K=16, T=3) and Qwen3-VL-4B (K=21, T=3: sdrpn's preset, none was released),
        # random weights, 1000x750 images at a fixed 576-token budget (20x27-token views of 28- and
        # 32-pixel cells). The engine's trimmed mode only: the processor sizes each RoI view by its
        # crop. Same RoIs as LLaVA's: box:0.25 is one region under Qwen's masked rule (its crop
        # zoomed to the budget, every token kept), masked:0.3 two corner regions (the whole image
        # re-encoded, about 30% of its tokens kept), none. sdrpn-reference at batch 1 only; Qwen3-VL
        # at batch 8 only, for the budget (its fast path against the reference: the CPU tests).
        local batch=${1##*_b} methods=baseline,sdrpn arch=qwen2.5-vl-7b
        [ "$batch" = 1 ] && methods+=,sdrpn-reference
        case $1 in e2e_qwen3_*) arch=qwen3-vl-4b ;; esac
        python_command --check-args benchmarks/bench_e2e.py --arch "$arch" --random-weights \
            --device cuda --dtype bfloat16 --batch "$batch" --new-tokens 16 --warmup 1 --repeats 3 \
            --rois box:0.25,masked:0.3,none --methods "$methods" --json "$RESULTS/e2e_qwen.json" --json-key "$1"
        step "$1" "${COMMAND[@]}" ;;
    bench_kernels)
        python_command parse benchmarks/bench_kernels.py --device cuda --json "$RESULTS/bench_kernels.json"
        step bench_kernels "${COMMAND[@]}" ;;
    bench_distill_7b)
        python_command parse benchmarks/bench_distill.py --device cuda --arch llava-1.5-7b --repeats 3 \
            --json "$RESULTS/bench_distill_7b.json"
        step bench_distill_7b "${COMMAND[@]}" ;;
    bench_distill_tiny)
        python_command parse benchmarks/bench_distill.py --device cuda --arch tiny \
            --json "$RESULTS/bench_distill_tiny.json"
        step bench_distill_tiny "${COMMAND[@]}" ;;
    ctest)  # the raw kernels without torch: every CUDA kernel against its CPU twin
        if ! command -v cmake > /dev/null; then
            record ctest absent 0 "cmake is not installed here"
        elif [ "$DRY_RUN" = 1 ]; then
            step ctest bash -c "cmake --version && ctest --version"
        else
            step ctest bash -c "cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build/cmake-gpu -j$(nproc) && ctest --test-dir build/cmake-gpu --output-on-failure"
        fi ;;
    esac
}

write_notes() {  # NOTES.md: the GPU targets, for whoever reads the run to fill in
    sed -e "s|@DEVICE@|${device:-unknown GPU}|" -e "s|@DATE@|$(date +%Y-%m-%d)|" \
        benchmarks/results/NOTES_TEMPLATE.md > "$RESULTS/NOTES.md"
}

write_notes
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
exit "$failed"
