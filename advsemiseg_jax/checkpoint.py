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


BEST_DIR = "best"


def best_manager(workdir: str) -> ocp.CheckpointManager:
  """``WORKDIR/checkpoints/best``: the one checkpoint with the highest val mIoU
  (its metrics are kept in Orbax's metadata, so a resumed run knows the best)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         best_fn=lambda m: m["miou"], best_mode="max")
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints", BEST_DIR)), options=options)


def best_miou(mngr: ocp.CheckpointManager):
  """(step, mIoU) of the best checkpoint so far, or ``None``."""
  step = mngr.best_step()
  if step is None:
    return None
  return step, float(mngr.metrics(step)["miou"])


def save_if_best(mngr: ocp.CheckpointManager, state, miou: float) -> bool:
  """Saves ``state`` as the best checkpoint when ``miou`` beats the best so far."""
  best = best_miou(mngr)
  step = int(jax.device_get(state.step))
  if best is not None and (miou <= best[1] or step == best[0]):
    return False
  mngr.save(step, args=ocp.args.StandardSave(state), metrics={"miou": float(miou)},
            force=True)
  return True
