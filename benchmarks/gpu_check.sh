#!/usr/bin/env bash
# The GPU checks in one run of about six minutes, for a machine with a CUDA device and a Python
# that has torch and depthlab's dependencies (depthlab itself is read from src/):
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. the CUDA tests (tests/test_cuda.py, tests/test_devices.py);
# 2. one smoke experiment with --set device=cuda (deep-fc: the fused MLP stack on the GPU);
# 3. bench_deep_resnet.py on cuda: 1,004 and 10,004 layers, 1x8x8 and 3x32x32, channels-last;
# 4. estimate_full.py --measure: timed training steps of the `full` networks of three
#    experiments, the hours they should take on this GPU.
#
# Each part has its own time limit and writes as it goes, so a part cut short keeps what it
# measured and the next part still runs. OUT_DIR gets at most eight files, none in subfolders.
set -u
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 4 "$OUT/$name.log"
}

"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name()
          if torch.cuda.is_available() else 'no CUDA device')" | tee "$OUT/summary.txt"
part tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_devices.py
part smoke 45 "$PY" -m depthlab run deep-fc --preset smoke --set device=cuda \
    --out "${TMPDIR:-/tmp}/depthlab-gpu-smoke"
part deep_resnet 90 "$PY" benchmarks/bench_deep_resnet.py --device cuda --layouts nhwc \
    --depths 1004,10004 --steps 3 --rounds 1 --max-act-gb 60 --csv "$OUT/deep_resnet_cuda.csv"
part full 120 "$PY" benchmarks/estimate_full.py --measure --device cuda --repeats 2 \
    --experiments deep-fc,transformer-convergence,depth-sweep \
    --measured-csv "$OUT/full_measured.csv" --steps-csv "$OUT/full_steps.csv"
