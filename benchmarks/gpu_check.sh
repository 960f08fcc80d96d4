#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA device and a Python that has torch and depthlab's
# dependencies (depthlab itself is read from src/):
#
#     bash benchmarks/gpu_check.sh OUT_DIR                 # all three parts, at most ~9 min
#     PARTS="check full" FULL=depth-sweep bash benchmarks/gpu_check.sh OUT_DIR
#
# check:  the CUDA tests (tests/test_cuda.py, tests/test_devices.py) and, beside them, one smoke
#         experiment with --set device=cuda (deep-fc: the fused MLP stack on the GPU); ~40 s.
# resnet: bench_deep_resnet.py on the device: 1,004 and 10,004 layers, 1x8x8 and 3x32x32,
#         channels-last, BN, Fixup and SkipInit; ~60 s for 1,004 layers, ~20 s per 10,004-layer
#         model on an H200 (limit RESNET_S, default 200 s; RESNET_ARGS replaces --depths 1004,10004,
#         e.g. "--depths 10004 --inputs 3x32x32").
# full:   estimate_full.py --measure: timed training steps of every network of the `full` grids
#         of the experiments in FULL (default: all training experiments, the deepest first), the
#         hours each should take on this GPU (limit FULL_S, default 240 s; all of them take
#         ~10 min on an H200: depth-sweep's 10,004-layer networks ~35 s each). Networks that
#         KNOWN (default benchmarks/results/full_steps_cuda.csv; KNOWN= for none) has timed on a
#         GPU of this name are not timed again; OUT/full_steps.csv holds them and the new ones.
# compile: bench_compile.py on the device (not in the default PARTS): eager against compiled
#         blocks and blocks replayed as CUDA graphs; COMPILE_ARGS (default
#         "--depths 1004 --schemes batchnorm,fixup --rounds 1 --warmup 3") picks the nets, limit
#         COMPILE_S (default 240 s).
#
# `check` checks correctness only, so its two runs share the GPU; `resnet` and `full` time, one
# at a time. Each part has its own time limit and writes as it goes, so a part cut short keeps
# what it measured and the next part still runs. OUT_DIR gets at most ten files, none in
# subfolders. DEVICE=cpu runs the same commands on the CPU (to try the script where no GPU is).
set -u
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PARTS=${PARTS:-check resnet full}
ALL=depth-sweep,deep-fc,transformer-convergence,skipinit-depth,fixup-ablation,batch-size
FULL=${FULL:-$ALL,transformer-jacobian,fc-convergence,bn-smoothness,degeneracy}

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 6 "$OUT/$name.log"
}

{
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch',
              torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available()
              else 'no CUDA device')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv,noheader 2>&1 | head -n 2
    nproc
} | tee "$OUT/summary.txt"
if [[ " $PARTS " == *" check "* ]]; then
    part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_devices.py &
    part smoke 90 "$PY" -m depthlab run deep-fc --preset smoke --set device="$DEVICE" \
        --out "${TMPDIR:-/tmp}/depthlab-gpu-smoke" &
    wait
fi
if [[ " $PARTS " == *" resnet "* ]]; then
    part deep_resnet "${RESNET_S:-200}" "$PY" benchmarks/bench_deep_resnet.py --device "$DEVICE" \
        --layouts nhwc ${RESNET_ARGS:---depths 1004,10004} --steps 2 --rounds 1 --max-act-gb 60 \
        --csv "$OUT/deep_resnet_cuda.csv"
fi
if [[ " $PARTS " == *" compile "* ]]; then
    part compile "${COMPILE_S:-240}" "$PY" benchmarks/bench_compile.py --device "$DEVICE" \
        ${COMPILE_ARGS:---depths 1004 --schemes batchnorm,fixup --rounds 1 --warmup 3} \
        --csv "$OUT/compile_resnet_cuda.csv"
fi
if [[ " $PARTS " == *" full "* ]]; then
    part full "${FULL_S:-240}" "$PY" benchmarks/estimate_full.py --measure --device "$DEVICE" \
        --repeats 2 --experiments "$FULL" --measured-csv "$OUT/full_measured.csv" \
        --steps-csv "$OUT/full_steps.csv" --known "${KNOWN-benchmarks/results/full_steps_cuda.csv}"
fi
