"""Device mesh and shardings: data parallel over a ``data`` axis.

Parameters and optimiser states are replicated; every batch is split along
its first axis. Hosts feed their local slice of each global batch
(``jax.make_array_from_process_local_data``), so the same code runs on one
CPU, one GPU, several GPUs or a multi-host TPU pod.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


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
