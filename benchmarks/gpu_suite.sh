#!/usr/bin/env bash
# One command for the day a GPU is lent: everything it measures goes under $OUT.
#
#   OUT=/path/to/out bash benchmarks/gpu_suite.sh            # on the GPU machine
#   OUT=/tmp/x bash benchmarks/gpu_suite.sh --dry-run        # print the commands only
#
# Run from the repository root. Eight minutes at most: each step has its own time
# limit (seconds, below: 430 in all with the wheel step, plus at most 5 s each to
# kill it); a step that fails or runs out of time is recorded in $OUT/status.txt,
# and the next one runs. Steps:
#   1. install: a carried wheel from wheels/ (expecttest, which the GPU machine lacks),
#      then this package (pip install --no-deps -e .)
#   2. the environment: nvidia-smi, torch/Triton/CUDA versions
#   3. the GPU tests (tests/gpu: capture + replay == eager over 50 steps under a
#      scheduler, set_sync_debug_mode("error") over steady steps)
#   4. measured steps: umup vs torch fused, kernels per step from the profiler and a
#      sync-debug check, on gpt-124m, gpt-1.2b and many-small (benchmarks.gpu_measure)
#   5. the harness on gpt-124m, gpt-1.2b and many-small (python -m benchmarks <workload>)
#   6. the codegen JSON from the real device, to sit beside the paper one
#      (benchmarks/results/paper-sm90): python -m benchmarks.gpu_codegen
set -u
OUT=${OUT:?set OUT to the folder where results go}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
PY=${PYTHON:-python}
# the checkout itself, should the editable install fail (no network for its build)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
: > "$OUT/status.txt"

step() { # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "+ [$name, ${limit}s] $*"
    if [ "$DRY" = 1 ]; then return 0; fi
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
}

WORKLOADS="gpt-124m gpt-1.2b many-small"
CONTESTANTS=umup-compiled,umup-capturable,torch-fused

if ls wheels/*.whl > /dev/null 2>&1; then
    step install-wheels 30 $PY -m pip install --no-deps --no-index wheels/*.whl
fi
step install 45 $PY -m pip install --no-deps -e .
step env 15 sh -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'"
# -o addopts: one process (the device machine has no pytest-xdist)
step gpu-tests 85 $PY -m pytest -o addopts=-ra -q -m gpu tests/gpu --junitxml="$OUT/gpu-tests.xml"
step measure 80 $PY -m benchmarks.gpu_measure --device cuda \
    --workload "$(echo $WORKLOADS | tr ' ' ',')" --json "$OUT/measured.json"
for w in $WORKLOADS; do
    step "harness-$w" 40 $PY -m benchmarks "$w" --device cuda \
        --contestants "$CONTESTANTS" --repeats 10 --warmup 3 --no-progress \
        --out "$OUT/harness"
done
step codegen 55 $PY -m benchmarks.gpu_codegen --config \
    gpt-124m:fp32:capturable,many-small:fp32:capturable --no-progress \
    --code-dir "$OUT/code" --json "$OUT/codegen-device.json"
if [ "$DRY" = 0 ]; then echo "done: $OUT/status.txt"; fi
