#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one go (one machine start):
#   bash benchmarks/gpu_check.sh        # VOC config: ResNet-101, 321x321, batch 10, semi on
#   CONFIG=configs/voc.py:quick SIZE=65 BATCH=2 STEPS=2 VS_ARGS="--backbone=tiny --width=8" \
#     ONLY="bf16 f32" DTYPES=float32 bash benchmarks/gpu_check.sh   # CPU smoke run
#
# Runs benchmarks/train_step.py in bfloat16, in float32, in bfloat16 without
# XLA's command buffers (with --profile: every kernel attributed to its op),
# in bfloat16 with rematerialised layer3 and in bfloat16 with
# optim.sequential_passes, each in its own process (so each peak memory is its
# own), benchmarks/vs_torch.py at the same size and batch, and
# benchmarks/checkpoint_save.py for the config's state; prints their tables.
# Synthetic batches: no TensorFlow needed.
#
# Compiling is most of the time (on an H200 one bf16 step compiled in 53-65 s,
# remat and sequential passes in over 110 s), and it is host work. So phase 1
# compiles every step at once, each in its own process, into one persistent
# compilation cache (JAX_COMPILATION_CACHE_DIR); phase 2 then runs the
# measurements one at a time, on an otherwise idle GPU, and loads each
# executable from that cache. The "compile" row of a phase-2 table is
# therefore the cache's load time: the compile times are phase 1's (all
# compiling together, so each one is longer than alone). XLA's autotuner
# times its candidate kernels while the other processes compile too.
#
# Every run is cut off at RUN_TIMEOUT seconds and the whole script stops
# starting runs DEADLINE seconds after it began, so that one slow compile
# cannot take the others' time; LOG (default: $OUT/gpu_check.log where OUT is
# set) receives everything printed.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/voc.py}
SIZE=${SIZE:-321}
BATCH=${BATCH:-10}
STEPS=${STEPS:-10}
VS_ARGS=${VS_ARGS:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
DEADLINE=${DEADLINE:-560}
LOG=${LOG:-${OUT:+$OUT/gpu_check.log}}
LOG=${LOG:-/dev/null}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
START=$SECONDS
exec > >(tee -a "$LOG") 2>&1

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>/dev/null \
  || echo "torch: not installed here, vs_torch skipped"
nproc; free -g 2>/dev/null | head -2

# The XLA:CPU flags matter on CPU only; on a GPU machine leave XLA_FLAGS alone.
TUNING=1
command -v nvidia-smi >/dev/null && TUNING=0
NO_COMMAND_BUFFERS="--xla_gpu_enable_command_buffer="

# name|XLA_FLAGS|train_step arguments, in the order phase 2 runs them.
VARIANTS=(
  "bf16||--set=model.compute_dtype=bfloat16 --measure_peak"
  "f32||--set=model.compute_dtype=float32 --measure_peak"
  "bf16_no_command_buffers|$NO_COMMAND_BUFFERS|--set=model.compute_dtype=bfloat16 --profile=3"
  "bf16_remat3||--set=model.compute_dtype=bfloat16 --set=model.remat_stages=3"
  "bf16_sequential||--set=model.compute_dtype=bfloat16 --set=optim.sequential_passes=true"
)
if [[ -n ${ONLY:-} ]]; then   # ONLY="bf16 f32": just these variants
  kept=(); for v in "${VARIANTS[@]}"; do [[ " $ONLY " == *" ${v%%|*} "* ]] && kept+=("$v"); done
  VARIANTS=("${kept[@]}")
fi
DTYPES=${DTYPES:-bfloat16,float32}

left() { echo $(( DEADLINE - (SECONDS - START) )); }
capped() {  # capped SECONDS command...: at most SECONDS, and never past the deadline
  local cap=$1; shift
  local remaining; remaining=$(left)
  (( remaining < cap )) && cap=$remaining
  if (( cap < 20 )); then echo "(skipped: $(left) s to the deadline)"; return 1; fi
  timeout "$cap" "$@" || echo "(ended with status $? after at most $cap s)"
}
train_step() {  # train_step XLA_FLAGS args...
  local flags=$1; shift
  XLA_FLAGS="${XLA_FLAGS:-} $flags" capped "$RUN_TIMEOUT" $PY benchmarks/train_step.py \
    --config="$CONFIG" --size="$SIZE" --batch="$BATCH" --steps="$STEPS" --warmup=2 \
    --xla_cpu_tuning=$TUNING "$@"
}
vs_torch_args=(--size="$SIZE" --batch="$BATCH" --conv_impl=auto --xla_cpu_tuning=$TUNING $VS_ARGS)

echo "=== phase 1: every step compiled at once into $JAX_COMPILATION_CACHE_DIR"
PHASE1=$(mktemp -d)
pids=()   # (a plain `wait` would also wait for the tee above)
for v in "${VARIANTS[@]}"; do
  IFS='|' read -r name flags rest <<< "$v"
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_PREALLOCATE=false train_step "$flags" $rest --compile_only \
    > "$PHASE1/$name.log" 2>&1 &
  pids+=($!)
done
if $PY -c "import torch" 2>/dev/null; then
  for d in ${DTYPES//,/ }; do   # vs_torch's JAX workers: they compile, then read no steps
    XLA_PYTHON_CLIENT_PREALLOCATE=false capped "$RUN_TIMEOUT" $PY benchmarks/vs_torch.py \
      --worker=jax --dtype="$d" "${vs_torch_args[@]}" < /dev/null > "$PHASE1/vs_torch_$d.log" 2>&1 &
    pids+=($!)
  done
fi
wait "${pids[@]}"
for f in "$PHASE1"/*.log; do echo "--- $(basename "$f" .log)"; tail -3 "$f"; done
echo "phase 1 took $(( SECONDS - START )) s"

echo "=== phase 2: one at a time"
run_variant() {
  local v
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r name flags rest <<< "$v"
    [[ $name == "$1" ]] || continue
    echo "=== train_step $name (XLA_FLAGS='$flags' $rest) at $(( SECONDS - START )) s"
    # shellcheck disable=SC2086
    train_step "$flags" $rest
  done
}
run_variant bf16
if $PY -c "import torch" 2>/dev/null; then
  echo "=== vs_torch ${vs_torch_args[*]} --dtypes=$DTYPES at $(( SECONDS - START )) s"
  capped "$RUN_TIMEOUT" $PY benchmarks/vs_torch.py "${vs_torch_args[@]}" --dtypes=$DTYPES \
    --rounds=5 --warmup=2
fi
for name in f32 bf16_no_command_buffers bf16_remat3 bf16_sequential; do run_variant "$name"; done
# A checkpoint save of the config's state: its host memory and time, in the
# background (the default off a CPU) and inline, with and without a limit.
echo "=== checkpoint_save at $(( SECONDS - START )) s"
capped 150 $PY benchmarks/checkpoint_save.py --config="$CONFIG" --write_mib=0,64 --background=1,0
echo "=== done at $(( SECONDS - START )) s"
