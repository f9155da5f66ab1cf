"""Evaluation around training on the demo's quick config: results.json, the
best checkpoint, TensorBoard pictures, mode=evaluate and mode=predict
reproducing the reported mIoU."""
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from advsemiseg_jax import metrics, plot
from advsemiseg_jax.config import load_config
from advsemiseg_jax.data import demo
from advsemiseg_jax.train import train_and_evaluate
from conftest import ROOT

NAMES = ["background", "striped disc", "dotted square", "plain triangle"]


def _config():
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  config.unlock()
  config.num_steps, config.eval_every, config.checkpoint_every = 4, 2, 2
  config.log_every, config.loss.semi_start = 2, 2
  config.eval_pictures = 2
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step run evaluated at steps 2 and 4: (workdir, final results)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train_and_evaluate(_config(), workdir)


def test_results_json_schema(run):
  workdir, results = run
  saved = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert saved["step"] == 4 and saved["dataset"] == "demo" and saved["split"] == "val"
  assert saved["protocol"] == "pad: padded to 64x64"
  assert list(saved["per_class_iou"]) == NAMES
  for key in ("miou", "miou_nonzero_diag", "pixel_accuracy", "mean_class_accuracy"):
    assert 0 <= saved[key] <= 100 and saved[key] == pytest.approx(results[key])
  ious = [v for v in saved["per_class_iou"].values() if v is not None]
  assert saved["miou"] == pytest.approx(np.mean(ious))
  assert saved["num_pixels"] > 0 and "tta" not in saved


def test_best_checkpoint_holds_the_best_evaluation(run):
  workdir, _ = run
  scalars = plot.read_scalars(workdir)
  steps, mious = scalars["val/miou"]
  assert list(steps) == [2, 4]
  best = os.listdir(os.path.join(workdir, "checkpoints", "best"))
  assert best == [str(steps[int(np.argmax(mious))])]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))   # latest kept too
  assert "val/miou_nonzero_diag" in scalars and "val_iou/background" in scalars


def test_tensorboard_pictures_are_readable_pngs(run):
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  workdir, _ = run
  acc = ea.EventAccumulator(workdir, size_guidance={ea.TENSORS: 0})
  acc.Reload()
  events = acc.Tensors("val/pictures")
  assert [e.step for e in events] == [2, 4]
  blobs = tensor_util.make_ndarray(events[-1].tensor_proto)   # [width, height, png...]
  pngs = blobs[2:]
  assert len(pngs) == 2
  picture = np.asarray(Image.open(io.BytesIO(pngs[0])))
  # input | ground truth | prediction | D confidence, 64 px each, 2 px gaps.
  assert picture.shape == (64, 4 * 64 + 3 * 2, 3)
  gt = picture[:, 66:130]
  labels = demo.scenes(demo.VAL_SEED, 0, 1, 64)[1][0]
  np.testing.assert_array_equal(gt[labels == 0], np.zeros(((labels == 0).sum(), 3)))
  assert (gt[labels == 255] == 255).all()


def test_evaluate_mode_reproduces_training_miou_and_adds_tta(run):
  workdir, trained = run
  config = _config()
  config.mode = "evaluate"
  config.tta.flip = True
  results = train_and_evaluate(config, workdir)
  assert results["step"] == 4
  assert results["miou"] == pytest.approx(trained["miou"], abs=1e-6)
  assert results["miou_nonzero_diag"] == pytest.approx(trained["miou_nonzero_diag"],
                                                       abs=1e-6)
  for name in NAMES:
    a, b = results["per_class_iou"][name], trained["per_class_iou"][name]
    assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6)
  saved = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert saved["tta"]["flip"] is True and saved["tta"]["scales"] == [1.0]
  assert set(saved["tta"]["per_class_iou"]) == set(NAMES)
  assert 0 <= saved["tta"]["miou"] <= 100


def test_predict_pngs_score_the_reported_miou(run, tmp_path, caplog):
  workdir, trained = run
  config = _config()
  images, labels = demo.scenes(demo.VAL_SEED, 0, config.data.demo.num_val, 64)
  inputs = tmp_path / "images"
  inputs.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(inputs / f"{i:03d}.png")
  (inputs / "zz_broken.png").write_bytes(b"not an image")
  config.mode = "predict"
  config.predict.input, config.predict.output = str(inputs), str(tmp_path / "out")
  config.predict.heatmaps = config.predict.overlay = True
  with caplog.at_level(logging.WARNING):
    summary = train_and_evaluate(config, workdir)
  assert summary["skipped"] == ["zz_broken.png"] and len(summary["written"]) == len(images)
  assert any("zz_broken.png" in r.getMessage() for r in caplog.records)

  conf = np.zeros((4, 4), np.int64)
  for i, label in enumerate(labels):
    pred = np.asarray(Image.open(tmp_path / "out" / "labels" / f"{i:03d}.png"))
    assert pred.shape == label.shape and pred.dtype == np.uint8
    valid = label < 4
    np.add.at(conf, (label[valid], pred[valid]), 1)
  mine = metrics.summarize(conf, NAMES)
  assert mine["miou"] == pytest.approx(trained["miou"], abs=1e-6)
  for sub in ("color", "confidence", "d_confidence", "overlay"):
    picture = Image.open(tmp_path / "out" / sub / "000.png")
    assert picture.size == (64, 64) and picture.mode == "RGB"
