"""The conversion CLI and ``config.init_from`` in training and evaluation."""
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as tr  # noqa: E402
from advsemiseg_jax import checkpoint, convert, models  # noqa: E402
from advsemiseg_jax.config import load_config  # noqa: E402
from advsemiseg_jax.train import build_training, train_and_evaluate  # noqa: E402
from conftest import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The authors' S (tiny, width 8, 21 classes, random weights) and D (width 8)."""
  tmp = tmp_path_factory.mktemp("pth")
  torch.manual_seed(0)
  model = tr.ResNetDeepLab(21, (1, 1, 1, 1), 8, early_return=True)
  tr.randomize_bn_stats(model, torch.Generator().manual_seed(0))
  model_d = tr.FCDiscriminator(21, 8)
  torch.save(model.state_dict(), tmp / "g.pth")
  torch.save(model_d.state_dict(), tmp / "d.pth")
  return tmp, model.eval(), model_d


def test_cli_writes_what_the_api_returns(files):
  tmp, model, model_d = files
  spec = "configs/voc_reference.py:quick"  # tiny, width 8, 21 classes, 2 branches
  dst = tmp / "converted"
  proc = subprocess.run(
      [sys.executable, "-m", "advsemiseg_jax.convert", str(tmp / "g.pth"), str(dst),
       f"--config={spec}", f"--discriminator={tmp / 'd.pth'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "copied 93 tensors" in proc.stdout and "copied 10 tensors" in proc.stdout
  assert f"--config.init_from={dst}" in proc.stdout
  loaded = convert.load_orbax(str(dst))
  config = load_config(str(ROOT / spec))
  jax.tree.map(np.testing.assert_array_equal, loaded["generator"],
               convert.load_torch_generator(tmp / "g.pth", config))
  jax.tree.map(np.testing.assert_array_equal, loaded["discriminator"],
               convert.load_torch_discriminator(tmp / "d.pth", config))
  x = (np.random.RandomState(0).randn(1, 65, 81, 3) * 50).astype(np.float32)
  out = models.build_generator(config.model, 21).apply(loaded["generator"], x)
  with torch.no_grad():
    ref = model(tr.to_nchw(x)).numpy().transpose(0, 2, 3, 1)
  assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_19_class_config_from_21_class_pth_reports_the_head_and_trains(files, caplog):
  tmp, model, _ = files
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  config.init_from = f"{tmp / 'g.pth'},{tmp / 'd.pth'}"
  config.optim.lr_g = 0.01
  with caplog.at_level(logging.INFO):
    _, _, state, step_fn = build_training(config, 19)
  log = caplog.text
  assert ("layer5.conv2d_list.0.weight: shape (21, 256, 3, 3) in the file, the model "
          "needs (19, 256, 3, 3)") in log
  assert "params/layer5/conv2d_list_0/kernel" in log          # left at init
  assert "conv1.weight: shape (8, 21, 4, 4) in the file" in log  # D's input channels
  np.testing.assert_array_equal(state.g_params["layer2_0"]["conv2"]["kernel"],
                                model.layer2[0].conv2.weight.detach().numpy()
                                .transpose(2, 3, 1, 0))
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(2, 64, 64, 3).astype(np.float32) * 50,
           "label": rng.randint(0, 19, (2, 64, 64)).astype(np.int32),
           "unlabeled_image": rng.randn(2, 64, 64, 3).astype(np.float32) * 50,
           "gt_label": rng.randint(0, 19, (2, 64, 64)).astype(np.int32)}
  step = jax.jit(step_fn)
  before = state.g_params["layer5"]["conv2d_list_0"]["kernel"]
  for _ in range(2):
    state, metrics = step(state, batch)
  assert all(np.isfinite(float(v)) for v in jax.device_get(metrics).values())
  assert not np.allclose(state.g_params["layer5"]["conv2d_list_0"]["kernel"], before)

  # A training checkpoint (workdir) as init_from: S, its BN statistics and D.
  workdir = tmp / "work19"
  mngr = checkpoint.manager(str(workdir), 1)
  checkpoint.save(mngr, state, force=True)
  mngr.wait_until_finished()
  mngr.close()
  config.init_from = str(workdir)
  _, _, restarted, _ = build_training(config, 19)
  assert int(restarted.step) == 0  # Weights only, a fresh start.
  for a, b in ((restarted.g_params, state.g_params),
               (restarted.g_batch_stats, state.g_batch_stats),
               (restarted.d_params, state.d_params)):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_evaluate_mode_with_init_from(tmp_path):
  """mode=evaluate evaluates the converted weights when the workdir has no
  checkpoint of its own."""
  torch.manual_seed(1)
  model = tr.ResNetDeepLab(5, (1, 1, 1, 1), 8, early_return=True)
  torch.save({"state_dict": model.state_dict()}, tmp_path / "demo.pth")
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  config.mode = "evaluate"
  config.model.aspp_branches = 2
  config.init_from = str(tmp_path / "demo.pth")
  results = train_and_evaluate(config, str(tmp_path / "work"))
  assert results["step"] == 0 and np.isfinite(results["miou"])
  config.init_from = ""
  with pytest.raises(FileNotFoundError, match="init_from"):
    train_and_evaluate(config, str(tmp_path / "work2"))
