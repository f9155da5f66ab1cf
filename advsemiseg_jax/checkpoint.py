"""Orbax checkpoints of the whole training state in ``WORKDIR/checkpoints``.

Saves are atomic: Orbax writes a step into a temporary directory and renames
it when complete, so a kill during a save leaves only a temporary directory
(removed at the next start) and every listed step is finalised. On restore,
a step that still cannot be read (damaged files) is moved to
``WORKDIR/checkpoints_corrupt`` with a warning and the previous step is used;
a checkpoint whose tree or shapes differ from the configured model is refused
with the differing entries named, never overwritten.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from advsemiseg_jax.validate import ConfigError

CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointMismatchError(ConfigError):
  """The workdir's checkpoint was written by a different model config."""


def saves_in_background(checkpoint_async=None) -> bool:
  """``config.checkpoint_async``, or where it is None (auto) whether the
  devices are not CPUs.

  Orbax's background save first copies the state to host memory, so that
  the next step may overwrite the donated buffers. Where the devices are
  CPUs that is a second copy of the whole state in the same memory (0.4 GiB
  at ResNet-101); an inline save writes from the arrays themselves
  (docs/performance.md, twenty-fourth session).
  """
  if checkpoint_async is None:
    return jax.default_backend() != "cpu"
  return bool(checkpoint_async)


def write_limit(state, mib: int):
  """Bytes of ``state`` (arrays or their shapes) that a save may encode at
  once: ``mib`` MiB, or the largest array's size if that is larger (Orbax
  refuses an array larger than its limit); None for ``mib == 0`` (no
  limit)."""
  if not mib:
    return None
  largest = max((int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(state)), default=0)
  return max(int(mib) * 2**20, largest)


def _handler(write_bytes=None) -> ocp.StandardCheckpointHandler:
  if write_bytes is None:
    return ocp.StandardCheckpointHandler()
  # Orbax takes the limit in GB (10**9 bytes) and counts it in bytes; the
  # margin keeps the product's rounding from refusing an array of the limit.
  return ocp.StandardCheckpointHandler(save_concurrent_gb=(write_bytes + 1024) / 1e9)


def manager(workdir: str, max_to_keep: int, checkpoint_async=None,
            write_bytes=None) -> ocp.CheckpointManager:
  """The manager of ``WORKDIR/checkpoints``, keeping the newest ``max_to_keep``
  steps; temporary directories of interrupted saves are cleaned up. Saves
  run in the background as ``saves_in_background(checkpoint_async)`` says
  and encode at most ``write_bytes`` at once (``write_limit``; None: no
  limit)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=saves_in_background(checkpoint_async))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_handlers=_handler(write_bytes))


def save(mngr: ocp.CheckpointManager, state, force: bool = False):
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)
  return step


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree) -> dict:
  """{"g_params/layer5/conv2d_list_0/kernel": shape, ...} of a state or of a
  checkpoint's metadata tree (both spell paths the same way)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def mismatches(stored: dict, expected: dict) -> list:
  """Lines naming the entries whose presence or shape differ."""
  out = []
  for name in sorted(set(stored) | set(expected)):
    if name not in stored:
      out.append(f"{name}: missing in the checkpoint")
    elif name not in expected:
      out.append(f"{name}: not in this config's model")
    elif stored[name] != expected[name]:
      out.append(f"{name}: checkpoint {stored[name]} vs config {expected[name]}")
  return out


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _process():
  """(this process's index, the number of processes)."""
  return jax.process_index(), jax.process_count()


def all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process. A collective: with several
  processes, each must call it the same number of times."""
  if _process()[1] == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.bool_))))


def _set_aside(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Moves an unreadable step out of the manager's directory (kept for
  inspection, and so that a later save of that step does not collide).

  Every process calls this once it is agreed that the step is unreadable;
  process 0 moves the directory and the others wait for it at a barrier, so
  that no process lists the step after it is gone or before.
  """
  src = step_dir(mngr, step)
  root = os.path.join(os.path.dirname(str(mngr.directory)), CORRUPT_DIR)
  where = f"moved to {root} by process 0"
  index, count = _process()
  if index == 0:
    os.makedirs(root, exist_ok=True)
    dst, n = os.path.join(root, str(step)), 1
    while os.path.exists(dst):
      dst, n = os.path.join(root, f"{step}.{n}"), n + 1
    shutil.move(src, dst)
    where = f"moved to {dst}"
  if count > 1:
    multihost_utils.sync_global_devices(f"advsemiseg_checkpoint_set_aside_{step}")
  summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  logging.warning("checkpoint %s is unreadable (%s: %s); %s, using the previous "
                  "checkpoint", src, type(error).__name__, summary, where)
  mngr.reload()


class _UnreadableElsewhere(Exception):
  """Another process could not read the step."""


def restore_latest(mngr: ocp.CheckpointManager, state):
  """The latest readable checkpoint restored into ``state``'s structure and
  shardings, or ``None`` when there is none.

  Unreadable steps are set aside with a warning (see the module docstring);
  a readable checkpoint of a different model raises CheckpointMismatchError.
  With several processes, a step counts as readable only if every process
  read it, so all of them resume from the same step.
  """
  expected = flat_shapes(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(mngr.all_steps(), reverse=True):
    error, stored = None, {}
    try:
      stored = flat_shapes(mngr.item_metadata(step))
      if not stored:
        raise ValueError("no array metadata")
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many types.
      error = e
    if not all_processes_agree(error is None):
      _set_aside(mngr, step, error or _UnreadableElsewhere("metadata unreadable on another process"))
      continue
    diff = mismatches(stored, expected)
    if diff:
      shown = "; ".join(diff[:6]) + (f"; ... {len(diff) - 6} more" if len(diff) > 6 else "")
      raise CheckpointMismatchError(
          f"{step_dir(mngr, step)} was written by a different model config "
          f"({len(diff)} entries differ: {shown}). Use another --workdir, or the "
          "config that wrote it")
    restored = None
    try:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if all_processes_agree(error is None):
      return restored
    _set_aside(mngr, step, error or _UnreadableElsewhere("data unreadable on another process"))
  return None

BEST_DIR = "best"


def best_manager(workdir: str, checkpoint_async=None,
                 write_bytes=None) -> ocp.CheckpointManager:
  """``WORKDIR/checkpoints/best``: the one checkpoint with the highest val mIoU
  (its metrics are kept in Orbax's metadata, so a resumed run knows the best).
  Saves as ``manager``'s."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, best_fn=lambda m: m["miou"], best_mode="max",
      enable_async_checkpointing=saves_in_background(checkpoint_async))
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints", BEST_DIR)), options=options,
      item_handlers=_handler(write_bytes))


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
