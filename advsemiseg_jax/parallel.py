"""Device mesh, shardings, multi-host start-up: data parallel over ``data``.

Parameters and optimiser states are replicated; every batch is split along
its first axis. Hosts feed their local slice of each global batch
(``jax.make_array_from_process_local_data``), so the same code runs on one
CPU, one GPU, several GPUs or a multi-host TPU pod.
"""
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# XLA:CPU flags our CPU measurements showed to help (docs/performance.md):
# YNNPACK runs the elementwise fusions and the matrix products, and XLA's own
# convolution runtime the convolutions (YNNPACK's 3x3 convolutions ran up to
# 1.7x slower on the step's 21x21 and 41x41 maps). An unknown flag or value
# aborts XLA, so they are added only on jaxlib versions where they were
# checked to exist.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=+eltwise,+dot,-individual_convolution",)
CPU_XLA_FLAGS_CHECKED_FROM = (0, 10)


def merged_xla_flags(current: str, flags) -> str:
  """``current`` (an ``XLA_FLAGS`` string) plus each of ``flags`` whose name
  it does not already set: a flag the user set keeps the user's value."""
  for flag in flags:
    if flag.split("=")[0] not in current:
      current = f"{current} {flag}".strip()
  return current


def set_default_xla_flags(enable: bool = True) -> str:
  """Adds ``CPU_XLA_FLAGS`` to ``XLA_FLAGS`` (call before JAX's first
  computation: XLA reads the variable when its backend starts).

  A flag whose name the user's ``XLA_FLAGS`` already sets is left as the user
  set it; ``enable=False`` adds nothing. Returns the resulting ``XLA_FLAGS``.
  """
  import jaxlib
  current = os.environ.get("XLA_FLAGS", "")
  version = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
  if enable and version >= CPU_XLA_FLAGS_CHECKED_FROM:
    current = merged_xla_flags(current, CPU_XLA_FLAGS)
    os.environ["XLA_FLAGS"] = current
  return current


CPU_ASYNC_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"


def set_cpu_inline_execution(environ=os.environ) -> bool:
  """Makes XLA:CPU run each one-device computation in the calling thread
  (JAX's ``jax_cpu_enable_async_dispatch`` off; call before JAX's backend
  starts). Returns whether it did: not when ``JAX_CPU_ENABLE_ASYNC_DISPATCH``
  is set (the user's choice, ``=1`` keeps JAX's default). GPUs and TPUs, and
  computations over several CPU devices, are not concerned.

  Under asynchronous dispatch a step's temporary buffer (428 MiB for
  ResNet-101 at 161x161, batch 2) is given back by the thread that ran the
  step after its outputs are ready, and the next step can take its own before
  that. tcmalloc (main.py's CPU allocator) keeps what is freed, so from then
  on both buffers stay resident. A loop that does not wait for each step
  (``train.py``'s) did so every time: the process's peak rose from 1.41 to
  1.84-1.86 GiB within 12 steps. A loop that waits for each step (the
  benchmarks') in 3 of 4 runs of 12 steps. Executed inline, a step gives its
  buffer back before the call returns: 1.41 GiB in both loops
  (docs/performance.md, twentieth session; tests/test_dispatch.py).
  """
  if CPU_ASYNC_DISPATCH_ENV in environ:
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def prepare_cpu_backend(xla_cpu_tuning: bool = True, environ=os.environ) -> dict:
  """What ``main.py`` sets before JAX's backend starts, in one call, so that the
  benchmarks measure the step ``main.py`` runs: ``set_default_xla_flags``
  (``xla_cpu_tuning=False`` adds none) and ``set_cpu_inline_execution``.
  Returns ``{"xla_flags": ..., "inline": ...}``, what each of them returned.
  Both leave what the user set in the environment as it is."""
  return dict(xla_flags=set_default_xla_flags(xla_cpu_tuning),
              inline=set_cpu_inline_execution(environ))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, auto: bool = False) -> bool:
  """``jax.distributed.initialize`` for multi-host runs (one process per host).

  With ``coordinator_address`` (``host:port`` of process 0) the three values
  are passed explicitly (multi-node GPU clusters without a scheduler). With
  ``auto`` JAX detects them itself (TPU pods, SLURM, Open MPI). The standard
  variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` fill in what the arguments leave empty. Returns whether
  it initialised; a single-host run needs none of it.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(env.get("JAX_PROCESS_ID", "-1"))
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError("a coordinator address needs the number of processes and "
                       "this process's id (flags or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if jax.config.jax_platforms == "cpu" or env.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if auto:
    jax.distributed.initialize()
    return True
  return False


def make_mesh(devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(global_batch: int, mesh, what: str = "data.batch_size"):
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} is not divisible by the "
                     f"{n} devices of the mesh")


def to_global(batch, mesh):
  """Host-local numpy batch -> global arrays sharded over ``data``."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def jit_train_step(step_fn, mesh):
  """``step_fn(state, batch)`` jitted over ``mesh``: state replicated and
  donated, batch split on ``data``, measurements replicated."""
  repl = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(repl, batch_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def replicate_state(state, mesh):
  """A newly built ``state`` replicated over ``mesh``, then JAX's in-memory
  caches cleared (as ``compile_train_step`` clears them).

  Once the state exists they hold what built it: the initialiser's traced
  and compiled programs and the optimiser's eager operations, which a
  training loop never runs again. On a CPU at ResNet-101, 161x161, batch 2
  that was 31 MiB of the process once the state was built, and the peak
  during the steps went from 1.40 to 1.37 GiB (docs/performance.md,
  twenty-second session). Other jitted functions compile again at their
  next call; a ``compile_train_step`` step is not concerned.
  """
  state = jax.device_put(state, replicated(mesh))
  jax.clear_caches()
  return state


def compile_train_step(jitted, state, batch):
  """``jitted`` (``jit_train_step``'s) compiled ahead of time for ``state``
  and ``batch``, with JAX's caches cleared before and after.

  The returned ``jax.stages.Compiled`` holds its executable; a training loop
  never uses what JAX's caches keep to trace or compile again (the
  initialiser's executable, the step's jaxpr and lowering). On a CPU at
  ResNet-101, 161x161, batch 2 that was 37 + 31 MiB of the process's memory
  (docs/performance.md). A call with other shapes or shardings raises instead
  of compiling again; other jitted functions compile again at their next
  call.
  """
  jax.clear_caches()
  compiled = jitted.lower(state, batch).compile()
  jax.clear_caches()
  return compiled
