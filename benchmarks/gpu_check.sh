#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one go (one machine start):
#   bash benchmarks/gpu_check.sh                  # VOC config: ResNet-101, 321x321, batch 10, semi on
#   CONFIG=configs/voc.py:quick SIZE=65 BATCH=2 STEPS=2 bash benchmarks/gpu_check.sh   # CPU smoke run
# Runs benchmarks/train_step.py in bfloat16 (with --profile: where the time
# goes), in float32, in bfloat16 with rematerialised layer3 and in bfloat16
# with optim.sequential_passes, each in its own process (so each peak memory
# is its own), and prints their tables. Synthetic batches: no TensorFlow needed.
# Each run is cut off after RUN_TIMEOUT seconds so that one slow compile
# cannot take the others' time. On an H200 (2026-11-28) the plain bf16 step
# compiled in 53-65 s, while the remat and sequential runs had not compiled
# after 110 s: the default cap is 200 s.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/voc.py}
SIZE=${SIZE:-321}
BATCH=${BATCH:-10}
STEPS=${STEPS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-200}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null \
  || echo "torch: not installed here, vs_torch skipped"
# Does this jaxlib know the CPU flag that parallel.set_default_xla_flags adds?
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+eltwise,+dot $PY -c "import jax; jax.numpy.ones(1).block_until_ready(); print('ynn flag: known')" 2>&1 | tail -1

# The XLA:CPU flags matter on CPU only; on a GPU machine leave XLA_FLAGS alone.
TUNING=1
command -v nvidia-smi >/dev/null && TUNING=0
run() {
  echo "=== train_step $*"
  timeout "$RUN_TIMEOUT" $PY benchmarks/train_step.py --config="$CONFIG" --size="$SIZE" \
    --batch="$BATCH" --steps="$STEPS" --warmup=2 --xla_cpu_tuning=$TUNING "$@" \
    || echo "(run ended with status $?)"
}
run --set=model.compute_dtype=bfloat16 --measure_peak --profile=3
run --set=model.compute_dtype=float32 --measure_peak
run --set=model.compute_dtype=bfloat16 --set=model.remat_stages=3
run --set=model.compute_dtype=bfloat16 --set=optim.sequential_passes=true
