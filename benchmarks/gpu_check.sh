#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine: every step must finish, and each prints
# images/s. None of this had run on a GPU when it was written (docs/benchmarks.md#gpu-check).
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh # the same plumbing on the CPU, tiny sizes
#
# Steps: synth small data -> prepare -> pack; STEPS training steps with --amp fp16
# --channels-last, once more with --compile; torchrun (one process per GPU, at most 2)
# with --sync-bn; evaluate (plain and --tta flip) and predict with --device cuda; ONNX
# Runtime's CUDA provider when it is installed (skipped with a message otherwise).
#
# Environment: GPU_CHECK_DEVICE (cuda, or cpu: no fp16, no --compile, tiny model and
# sizes), GPU_CHECK_OUT (scratch folder, default a new /tmp/urbanseg-gpu-check.XXXXXX,
# kept for inspection), GPU_CHECK_STEPS (default 200 on cuda, 10 on cpu), GPU_CHECK_NPROC
# (torchrun processes; default min(2, GPUs)), PYTHON (default: the repo's .venv, else
# python on PATH).
set -euo pipefail
shopt -s inherit_errexit  # a failing command inside $(...) stops the script too

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python || command -v python3 || true)"
fi
[[ -n "$PY" ]] || { echo "gpu_check: no python found: create the repo's .venv (make setup) or set PYTHON" >&2; exit 2; }

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
case "$DEVICE" in
    cuda | cpu) ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE=$DEVICE: use cuda or cpu" >&2; exit 2 ;;
esac
OUT="${GPU_CHECK_OUT:-$(mktemp -d /tmp/urbanseg-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
cd "$OUT"  # ONNX tooling may write external-data files into the current folder

urbanseg() { "$PY" -m urbanseg "$@"; }
declare -a SUMMARY=()
record() { SUMMARY+=("| $1 | $2 |"); echo ">>> $1: $2"; }
# Speeds are computed into a variable first: `set -e` ignores a failure inside $(...) that
# is only an argument of another command.
step() { echo; echo "=== $*"; }

# --------------------------------------------------------------------------- the GPU
if [[ "$DEVICE" == cuda ]]; then
    if ! GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"; then
        echo "gpu_check: cannot import torch with $PY" >&2
        exit 2
    fi
    if [[ "$GPUS" -lt 1 ]]; then
        echo "gpu_check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)." >&2
        echo "  Run this on a CUDA machine with a CUDA build of torch, or check the plumbing on the CPU:" >&2
        echo "  GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh" >&2
        exit 1
    fi
    "$PY" -c 'import torch; print("GPU:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
    STEPS="${GPU_CHECK_STEPS:-200}"
    NPROC="${GPU_CHECK_NPROC:-$((GPUS < 2 ? GPUS : 2))}"
    TRAIN_N=48 VAL_N=16 SCENE_SIZE=1024x512
    SIZE=512x256
    BATCH=8
    MODEL=()
    FAST=(--amp fp16 --channels-last)
    COMPILE=(--compile)
    ORT_PROVIDER=CUDAExecutionProvider
else
    echo "GPU_CHECK_DEVICE=cpu: the plumbing only, tiny sizes, no fp16 and no --compile"
    STEPS="${GPU_CHECK_STEPS:-10}"
    NPROC="${GPU_CHECK_NPROC:-1}"  # SyncBatchNorm needs GPUs: one process on the CPU
    TRAIN_N=6 VAL_N=4 SCENE_SIZE=128x64
    SIZE=64x32
    BATCH=4
    MODEL=(--model unet-original --model-args '{"base_channels": 4}')
    FAST=(--amp off --channels-last)
    COMPILE=()
    ORT_PROVIDER=CPUExecutionProvider
fi
echo "scratch folder: $OUT; python: $PY; $STEPS steps per training run"

train_run() {  # RUN EXTRA_FLAGS...: one training run
    local run="$1"
    shift
    urbanseg train --data "$OUT/shards" --run "$run" --iters "$STEPS" --batch-size "$BATCH" --val-every "$STEPS" \
        --log-every 5 --workers 2 --device "$DEVICE" "${MODEL[@]}" "${FAST[@]}" "$@"
}

train_speed() {  # RUN: median images/s of the logged training windows, the first (warm-up) left out
    "$PY" - "$1/metrics.csv" <<'EOF'
import csv, statistics, sys
rows = [float(r["images_per_s"]) for r in csv.DictReader(open(sys.argv[1])) if r["split"] == "train" and r["images_per_s"]]
speeds = rows[1:] or rows
print(f"{statistics.median(speeds):.1f} images/s (median of {len(speeds)} logged windows)" if speeds else "no speed logged")
EOF
}

# --------------------------------------------------------------------------- data
step "synth -> prepare -> pack"
rm -rf "$OUT/data" "$OUT/prepared" "$OUT/shards" "$OUT"/run-*
urbanseg synth --out "$OUT/data" --train "$TRAIN_N" --val "$VAL_N" --size "$SCENE_SIZE" --workers 0
urbanseg prepare --data "$OUT/data" --out "$OUT/prepared" --size "$SIZE" --splits train val
urbanseg pack --prepared "$OUT/prepared" --out "$OUT/shards" --shards 2 --splits train val

# --------------------------------------------------------------------------- training
step "train: $STEPS steps, ${FAST[*]}"
train_run "$OUT/run-amp"
SPEED="$(train_speed "$OUT/run-amp")"
record "train ${FAST[*]}" "$SPEED"

if [[ ${#COMPILE[@]} -gt 0 ]]; then
    step "train: $STEPS steps, ${FAST[*]} --compile"
    train_run "$OUT/run-compile" "${COMPILE[@]}"
    SPEED="$(train_speed "$OUT/run-compile")"
    record "train ${FAST[*]} --compile" "$SPEED"
else
    record "train --compile" "skipped on the CPU"
fi

step "torchrun --nproc_per_node=$NPROC: $STEPS steps, --sync-bn"
if [[ "$NPROC" -lt 2 ]]; then
    echo "(one process: world size 1 trains without DistributedDataParallel, so --sync-bn has nothing to sync;"
    echo " this checks torchrun's launch. Two or more GPUs exercise NCCL and SyncBatchNorm.)"
fi
# `--`: torchrun's parser would otherwise take --run for an abbreviation of its --run-path
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m urbanseg -- \
    train --data "$OUT/shards" --run "$OUT/run-torchrun" --iters "$STEPS" --batch-size "$BATCH" \
    --val-every "$STEPS" --log-every 5 --workers 2 --device "$DEVICE" "${MODEL[@]}" "${FAST[@]}" --sync-bn
SPEED="$(train_speed "$OUT/run-torchrun")"
record "torchrun x$NPROC --sync-bn ${FAST[*]}" "$SPEED"

# --------------------------------------------------------------------------- evaluate, predict
eval_speed() {  # RUN: images/s from evaluate's metrics.json (data loading included)
    "$PY" - "$1/eval/val/metrics.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['num_images'] / max(d['seconds'], 1e-9):.1f} images/s ({d['num_images']} images, data loading included)")
EOF
}
step "evaluate --device $DEVICE"
urbanseg evaluate --run "$OUT/run-amp" --device "$DEVICE" --gallery 1
SPEED="$(eval_speed "$OUT/run-amp")"
record "evaluate" "$SPEED"
step "evaluate --device $DEVICE --tta flip --scales 0.75,1,1.25"
urbanseg evaluate --run "$OUT/run-amp" --device "$DEVICE" --gallery 1 --tta flip --scales 0.75,1,1.25
SPEED="$(eval_speed "$OUT/run-amp")"
record "evaluate --tta flip --scales 0.75,1,1.25" "$SPEED"

timed() {  # N COMMAND...: run it (its output to stderr), then print N / wall-clock seconds
    local n="$1" start end
    shift
    start="$(date +%s.%N)"
    "$@" >&2
    end="$(date +%s.%N)"
    "$PY" -c 'import sys; n, s = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]); print(f"{n / s:.1f} images/s ({n} images in {s:.1f} s wall clock, start-up included)")' \
        "$n" "$start" "$end"
}
step "predict --device $DEVICE"
SPEED="$(timed "$VAL_N" urbanseg predict --run "$OUT/run-amp" --split val --num "$VAL_N" --device "$DEVICE" --out "$OUT/predict")"
record "predict --split val" "$SPEED"

# --------------------------------------------------------------------------- ONNX Runtime
step "ONNX Runtime, $ORT_PROVIDER"
if "$PY" -c 'import sys, onnxruntime as ort; sys.exit(0 if sys.argv[1] in ort.get_available_providers() else 1)' "$ORT_PROVIDER"; then
    urbanseg export --run "$OUT/run-amp" --out "$OUT/run-amp/best.onnx"
    ORT_SPEED="$("$PY" - "$OUT/run-amp/best.onnx" "$ORT_PROVIDER" "$SIZE" <<'EOF'
import sys, time
import numpy as np
import onnxruntime as ort
path, provider, size = sys.argv[1], sys.argv[2], sys.argv[3]
session = ort.InferenceSession(path, providers=[provider])
if session.get_providers()[0] != provider:
    sys.exit(f"ONNX Runtime fell back to {session.get_providers()} instead of {provider}")
w, h = (int(v) for v in size.split("x"))
batch = np.random.default_rng(0).uniform(0, 255, (8, 3, h, w)).astype(np.float32)
name = session.get_inputs()[0].name
session.run(None, {name: batch})  # warm-up
start, runs = time.perf_counter(), 5
for _ in range(runs):
    session.run(None, {name: batch})
print(f"{runs * len(batch) / (time.perf_counter() - start):.1f} images/s (batch 8 at {size}, {provider})")
EOF
)"
    record "ONNX Runtime $ORT_PROVIDER (session.run)" "$ORT_SPEED"
    step "predict --model best.onnx"
    SPEED="$(timed "$VAL_N" urbanseg predict --model "$OUT/run-amp/best.onnx" --data "$OUT/shards" --split val --num "$VAL_N" --out "$OUT/predict-onnx")"
    record "predict --model best.onnx" "$SPEED"
else
    record "ONNX Runtime $ORT_PROVIDER" "skipped: not in onnxruntime's providers (pip install onnxruntime-gpu for CUDA)"
fi

echo
echo "gpu_check: every step finished ($DEVICE, scratch folder $OUT)"
echo "| step | throughput |"
echo "|-|-|"
printf '%s\n' "${SUMMARY[@]}"
