"""End to end: train_and_evaluate and main.py on the demo's quick config."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from advsemiseg_jax import checkpoint
from advsemiseg_jax.train import Trainer, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_params(config, workdir):
  trainer = Trainer(config, str(workdir))
  mngr = checkpoint.manager(str(workdir), 5)
  state = checkpoint.restore_latest(mngr, trainer.abstract_state)
  mngr.close()
  return jax.device_get(state)


def test_quick_run_writes_results_checkpoint_and_events(quick_config, tmp_path, monkeypatch):
  results = train_and_evaluate(quick_config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == 30 and saved["dataset"] == "demo"
  assert set(saved["per_class_iou"]) == {"background", "striped disc", "dotted square",
                                         "plain triangle"}
  assert 0 <= saved["miou"] <= 100 and saved["miou"] == pytest.approx(results["miou"])
  assert os.path.isdir(tmp_path / "checkpoints" / "30")
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))

  # Again on the finished workdir: nothing is retrained, nor compiled.
  mtime = os.path.getmtime(tmp_path / "checkpoints" / "30")
  monkeypatch.setattr(Trainer, "compile_train_step",
                      lambda self: pytest.fail("a finished run compiled its step"))
  again = train_and_evaluate(quick_config, str(tmp_path))
  assert again["step"] == 30 and again["miou"] == pytest.approx(saved["miou"])
  assert os.path.getmtime(tmp_path / "checkpoints" / "30") == mtime

  # mode=evaluate evaluates the latest checkpoint.
  quick_config.mode = "evaluate"
  evaluated = train_and_evaluate(quick_config, str(tmp_path))
  assert evaluated["miou"] == pytest.approx(saved["miou"])


def test_resume_after_interruption_matches_uninterrupted_run(quick_config, tmp_path):
  quick_config.checkpoint_every = 10
  quick_config.max_to_keep = 5
  train_and_evaluate(quick_config, str(tmp_path / "full"))
  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  for step in ("20", "30"):                   # as if killed just after step 10's save
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / step)
  train_and_evaluate(quick_config, str(tmp_path / "cut"))
  full = _final_params(quick_config, tmp_path / "full")
  cut = _final_params(quick_config, tmp_path / "cut")
  assert int(cut.step) == 30
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _record_order(monkeypatch, events):
  """Appends "compile" and "restore" to ``events`` as train_and_evaluate
  compiles its step and restores its checkpoint."""
  from advsemiseg_jax import train
  compile_step, restore = Trainer.compile_train_step, checkpoint.restore_latest
  monkeypatch.setattr(Trainer, "compile_train_step",
                      lambda self: events.append("compile") or compile_step(self))
  monkeypatch.setattr(train.checkpoint, "restore_latest",
                      lambda *a: events.append("restore") or restore(*a))


def test_unreadable_last_checkpoint_is_retrained_from_the_one_before(quick_config, tmp_path,
                                                                     monkeypatch):
  """The last step's checkpoint unreadable: the run looks finished, so the
  step is not compiled up front, but it is compiled when the loop needs it,
  and training goes on from the readable checkpoint before to the same
  parameters."""
  quick_config.checkpoint_every = 10
  quick_config.max_to_keep = 5
  fresh, resumed = [], []
  _record_order(monkeypatch, fresh)
  train_and_evaluate(quick_config, str(tmp_path / "full"))
  assert fresh == ["compile", "restore"]   # compiled before any state exists
  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "20")
  for root, _, names in os.walk(tmp_path / "cut" / "checkpoints" / "30"):
    for name in names:   # every file of step 30 zeroed, sizes kept
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))
  monkeypatch.undo()
  _record_order(monkeypatch, resumed)
  train_and_evaluate(quick_config, str(tmp_path / "cut"))
  assert resumed == ["restore", "compile"]   # compiled when the loop needed it
  assert os.path.isdir(tmp_path / "cut" / checkpoint.CORRUPT_DIR / "30")
  full = _final_params(quick_config, tmp_path / "full")
  cut = _final_params(quick_config, tmp_path / "cut")
  assert int(cut.step) == 30
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_main_rejects_unknown_key_and_variant(tmp_path):
  proc = _main("--config=configs/demo.py:quick", f"--workdir={tmp_path}",
               "--config.loss.lamda_adv=0.1")
  assert proc.returncode != 0 and "lamda_adv" in proc.stderr
  proc = _main("--config=configs/demo.py:quik", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "unknown config variant" in proc.stderr


def test_main_baseline_quick_runs(tmp_path):
  proc = _main("--config=configs/demo.py:baseline,quick", f"--workdir={tmp_path}",
               "--config.num_steps=6", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mIoU" in proc.stderr
  assert json.loads((tmp_path / "results.json").read_text())["step"] == 6
