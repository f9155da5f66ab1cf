"""Orbax checkpoints of the whole training state in ``WORKDIR/checkpoints``."""
import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(mngr: ocp.CheckpointManager, state, force: bool = False):
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)
  return step


def restore_latest(mngr: ocp.CheckpointManager, state):
  """The latest checkpoint restored into ``state``'s structure and shardings,
  or ``None`` when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
