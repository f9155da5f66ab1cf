"""Checkpoint safety and the non-finite guard (in-process, small states)."""
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from advsemiseg_jax import checkpoint, faults
from advsemiseg_jax.faults import NONFINITE_G_GRAD, NONFINITE_LOSS
from advsemiseg_jax.step import TrainState
from advsemiseg_jax.train import build_training, train_and_evaluate

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step, width=3, value=None):
  """A small TrainState-shaped tree (what the manager saves)."""
  value = float(step) if value is None else value
  return TrainState(step=jnp.asarray(step, jnp.int32),
                    g_params={"conv": {"kernel": jnp.full((2, width), value)}},
                    g_batch_stats={"bn": {"mean": jnp.zeros((width,))}},
                    d_params={"classifier": {"bias": jnp.ones((1,))}},
                    g_opt_state=(jnp.zeros((2, width)),), d_opt_state=(),
                    rng=jax.random.PRNGKey(0), nonfinite_skips=jnp.zeros((), jnp.int32))


def _saved_workdir(tmp_path, steps=(1, 2, 3)):
  mngr = checkpoint.manager(str(tmp_path), 5)
  for step in steps:
    checkpoint.save(mngr, _state(step), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return checkpoint.manager(str(tmp_path), 5)


def _damage(step_dir, keep=()):
  """Overwrites every file under ``step_dir`` but ``keep`` with zeros (keeps
  the sizes)."""
  damaged = 0
  for root, _, names in os.walk(step_dir):
    for name in names:
      if name in keep:
        continue
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.write(b"\0" * size)
      damaged += 1
  assert damaged


@pytest.mark.parametrize("what", ["data", "all", "empty"])
def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path, what, caplog):
  mngr = _saved_workdir(tmp_path)
  latest = os.path.join(str(mngr.directory), "3")
  if what == "data":
    _damage(os.path.join(latest, "default"), keep=("_METADATA", "_sharding"))
  elif what == "all":
    _damage(os.path.join(latest, "default"))
  else:  # a step folder with nothing in it
    for entry in os.listdir(latest):
      path = os.path.join(latest, entry)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  caplog.set_level(logging.WARNING)
  restored = checkpoint.restore_latest(mngr, _state(0))
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.g_params["conv"]["kernel"], 2.0)
  assert any(latest in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Set aside, so that training can save step 3 again.
  assert os.path.isdir(tmp_path / checkpoint.CORRUPT_DIR / "3")
  assert mngr.all_steps() == [1, 2]
  checkpoint.save(mngr, _state(3), force=True)
  mngr.wait_until_finished()
  assert int(checkpoint.restore_latest(mngr, _state(0)).step) == 3
  mngr.close()


def test_step_unreadable_on_another_process_is_set_aside_by_process_0_only(
    tmp_path, monkeypatch):
  """Multi-host: a step counts as readable only if every process read it.
  Here this process (index 1 of 2) reads step 3 fine but the other did not:
  this one must skip it too, leave the move to process 0 and wait at the
  barrier; so both resume from step 2."""
  import types
  mngr = _saved_workdir(tmp_path)
  calls = []
  # Metadata of step 3 agreed readable, its data not (the other process
  # failed); step 2 readable everywhere.
  answers = iter([[True, True], [True, False], [True, True], [True, True]])

  def barrier(name):  # Process 0 moves the directory while this one waits.
    calls.append(name)
    shutil.move(str(tmp_path / "checkpoints" / "3"), str(tmp_path / "moved_by_0"))
  monkeypatch.setattr(checkpoint, "_process", lambda: (1, 2))
  monkeypatch.setattr(checkpoint, "multihost_utils", types.SimpleNamespace(
      process_allgather=lambda x: calls.append(bool(x)) or np.asarray(next(answers)),
      sync_global_devices=barrier))
  restored = checkpoint.restore_latest(mngr, _state(0))
  assert int(restored.step) == 2
  assert calls == [True, True, "advsemiseg_checkpoint_set_aside_3", True, True]
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()  # process 1 moved nothing
  assert mngr.all_steps() == [1, 2]
  mngr.close()


def test_interrupted_save_leaves_only_a_temporary_directory(tmp_path):
  """A kill during a save leaves ``N.orbax-checkpoint-tmp-*``: never listed,
  removed when the next manager starts."""
  mngr = _saved_workdir(tmp_path, steps=(1,))
  mngr.close()
  tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"
  (tmp / "default").mkdir(parents=True)
  (tmp / "default" / "_METADATA").write_text("{trunc")
  mngr = checkpoint.manager(str(tmp_path), 5)
  assert mngr.all_steps() == [1]
  assert int(checkpoint.restore_latest(mngr, _state(0)).step) == 1
  mngr.close()
  assert not tmp.exists()


def test_checkpoint_of_another_model_is_refused_naming_entries(tmp_path):
  mngr = _saved_workdir(tmp_path, steps=(1,))
  other = _state(0, width=4)
  other = other.replace(d_params={"head": {"bias": jnp.ones((1,))}})
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    checkpoint.restore_latest(mngr, other)
  message = str(e.value)
  assert "different model config" in message and "checkpoints/1" in message
  assert "g_params/conv/kernel: checkpoint (2, 3) vs config (2, 4)" in message
  assert "d_params/classifier/bias: not in this config's model" in message
  assert "d_params/head/bias: missing in the checkpoint" in message
  assert mngr.all_steps() == [1]  # refused, not set aside or overwritten
  mngr.close()


def _small(config):
  """The quick config on 32x32 crops, batch 2: the same step, less to run."""
  config.data.crop_size = (32, 32)
  config.data.batch_size = 2
  return config


def _batch(config, bad_key=None):
  """A training batch (shapes of the quick config), with one non-finite value
  in ``bad_key``."""
  b, (h, w) = config.data.batch_size, config.data.crop_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
           "label": rng.integers(0, 4, (b, h, w)).astype(np.int32),
           "unlabeled_image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
           "gt_label": rng.integers(0, 4, (b, h, w)).astype(np.int32)}
  if bad_key:
    batch[bad_key][0, 0, 0, 0] = np.inf
  return batch


_ALL_FINITE_CHECK = textwrap.dedent("""
    import sys
    from advsemiseg_jax import parallel
    if sys.argv[1] == "ynn":
      parallel.set_default_xla_flags()
    import jax, jax.numpy as jnp, numpy as np
    from advsemiseg_jax.step import all_finite
    check = jax.jit(all_finite)
    big = np.full((64, 33), 1e30, np.float32)
    tree = {"big": big, "neg": -big, "half": jnp.ones((5, 7), jnp.bfloat16),
            "kernel": np.full((3, 3, 32, 64), -1e30, np.float32),
            "count": np.arange(6, dtype=np.int32), "small": np.zeros((), np.float32)}
    text = check.lower(tree).compile().as_text()
    assert "__ynn_fusion" in text or sys.argv[1] != "ynn", text
    assert bool(check(tree)) and bool(check({}))
    for key in ("big", "half", "kernel", "small"):
      for bad in (np.nan, np.inf, -np.inf):
        poisoned = dict(tree, **{key: jnp.asarray(tree[key]).at[(0,) * tree[key].ndim].set(bad)})
        assert not bool(check(poisoned)), (key, bad)
    # Finite, but summing beyond float32's range: counted as not finite.
    assert not bool(check(dict(tree, big=np.full((64, 33), 3e38, np.float32))))
    print("ALL_FINITE_OK")
""")


@pytest.mark.parametrize("flags", ["xla", "ynn"])
def test_all_finite_flags_nan_and_inf_under_jit(flags):
  """step.all_finite (a float32 sum per leaf): False for one NaN or +-inf in
  any float leaf, True for large finite values, bfloat16 leaves, integer
  leaves and no leaves; with XLA's CPU defaults (the tests') and with the
  YNNPACK fusions that main.py turns on, which run the sums."""
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  out = subprocess.run([sys.executable, "-c", _ALL_FINITE_CHECK, flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert "ALL_FINITE_OK" in out.stdout, out.stderr[-3000:]


def test_step_flags_nonfinite_and_skip_policy_keeps_the_state(quick_config):
  """Policy "skip" inside the jitted step (policy "stop" only differs in not
  keeping the state; the trainer test below covers it)."""
  quick_config = _small(quick_config)
  quick_config.nonfinite_policy = "skip"
  _, _, state, step_fn = build_training(quick_config, 4)
  step = jax.jit(step_fn)
  before = jax.device_get(state)
  new, metrics = step(state, _batch(quick_config, "image"))
  flag = int(metrics["nonfinite"])
  assert flag & NONFINITE_LOSS and flag & NONFINITE_G_GRAD
  assert "loss_ce=nan" in faults.describe_nonfinite(flag, jax.device_get(metrics))
  assert int(new.step) == 1 and int(new.nonfinite_skips) == 1
  after = jax.device_get(new.replace(step=state.step, nonfinite_skips=state.nonfinite_skips))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  # A good batch afterwards is not flagged, counted or kept back.
  new, metrics = step(new, _batch(quick_config))
  assert int(metrics["nonfinite"]) == 0 and int(new.nonfinite_skips) == 1
  assert not np.array_equal(jax.device_get(new.g_params["layer5"]["conv2d_list_0"]["bias"]),
                            before.g_params["layer5"]["conv2d_list_0"]["bias"])


def _poison(monkeypatch, at_step, only=False):
  """Training batches whose image holds an inf from ``at_step`` on (``only``:
  at that step alone)."""
  from advsemiseg_jax.train import Trainer
  original = Trainer.batches

  def batches(self, start_step):
    for i, batch in enumerate(original(self, start_step), start_step):
      if i == at_step or (i > at_step and not only):
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 0, 0, 0] = np.inf
      yield batch

  monkeypatch.setattr(Trainer, "batches", batches)


def test_train_stops_naming_step_and_loss_keeping_last_good_checkpoint(
    quick_config, tmp_path, monkeypatch):
  quick_config = _small(quick_config)
  quick_config.num_steps, quick_config.checkpoint_every = 8, 3
  quick_config.loss.semi_start = 2
  quick_config.log_every = 5
  _poison(monkeypatch, at_step=4)   # after the checkpoint of step 3
  with pytest.raises(faults.NonFiniteError) as e:
    train_and_evaluate(quick_config, str(tmp_path))
  message = str(e.value)
  assert "non-finite values at step 4" in message and "loss_ce=nan" in message
  assert "S's gradient" in message and "checkpoint is step 3" in message
  mngr = checkpoint.manager(str(tmp_path), 3)
  assert mngr.all_steps() == [3]    # stopped at the log of step 5: nothing saved after 3
  _, _, state, _ = build_training(quick_config, 4)
  restored = checkpoint.restore_latest(mngr, state)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored)))
  mngr.close()


def test_train_skip_policy_skips_counts_and_finishes(quick_config, tmp_path, monkeypatch,
                                                      caplog):
  """Policy "skip" through the training loop: the poisoned step is skipped
  with a warning naming it, counted in TensorBoard's train/nonfinite_skips and
  results.json, and training finishes with finite parameters."""
  quick_config = _small(quick_config)
  quick_config.num_steps, quick_config.checkpoint_every = 6, 3
  quick_config.loss.semi_start = 2
  quick_config.log_every = 3
  quick_config.nonfinite_policy = "skip"
  _poison(monkeypatch, at_step=4, only=True)
  caplog.set_level(logging.WARNING)
  results = train_and_evaluate(quick_config, str(tmp_path))
  assert results["step"] == 6 and results["nonfinite_skips"] == 1
  assert any("step 4: non-finite" in r.getMessage() and "update skipped" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  mngr = checkpoint.manager(str(tmp_path), 3)
  _, _, state, _ = build_training(quick_config, 4)
  restored = checkpoint.restore_latest(mngr, state)
  mngr.close()
  assert int(restored.step) == 6 and int(restored.nonfinite_skips) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored)))
  import json
  assert json.load(open(tmp_path / "results.json"))["nonfinite_skips"] == 1
