"""mode=predict on a folder of images of any size, and the picture helpers."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from advsemiseg_jax import checkpoint, palettes, predict
from advsemiseg_jax.data import ops
from advsemiseg_jax.train import build_training


def test_fit_to_canvas_and_to_canvas():
  image = np.full((100, 50, 3), 200, np.uint8)
  fitted = predict.fit_to_canvas(image, (64, 64))
  assert fitted.shape == (64, 32, 3)
  assert predict.fit_to_canvas(image[:40], (64, 64)) is not None
  assert predict.fit_to_canvas(image[:40], (64, 64)).shape == (40, 50, 3)
  x = predict.to_canvas(fitted, (64, 64))
  assert x.shape == (64, 64, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0], 200 - np.asarray(ops.RGB_MEAN, np.float32))
  assert (x[:, 32:] == 0).all()      # padding is the mean colour


def test_palette_helpers():
  names, palette = palettes.class_info(type("D", (), dict(
      name="voc", num_classes=21, class_names=()))())
  assert names[15] == "person" and tuple(palette[1]) == (128, 0, 0)
  names, palette = palettes.class_info(type("D", (), dict(
      name="folder", num_classes=3, class_names=("a", "b", "c")))())
  assert names == ("a", "b", "c") and palette.shape == (3, 3)
  colour = palettes.colorize(np.array([[0, 1], [2, 255]]), palette)
  assert colour.shape == (2, 2, 3) and tuple(colour[1, 1]) == palettes.IGNORE_COLOUR
  heat = palettes.heatmap(np.array([0.0, 0.5, 1.0, np.nan]))
  assert tuple(heat[0]) == (68, 1, 84) and tuple(heat[2]) == (253, 231, 37)
  assert tuple(heat[3]) == tuple(heat[0])
  grid = palettes.grid([[colour, colour], [colour]], gap=1)
  assert grid.shape == (5, 5, 3)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
  """A workdir holding the quick config's initial state as its checkpoint."""
  from advsemiseg_jax.config import load_config
  from conftest import ROOT
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  config.unlock()
  workdir = str(tmp_path_factory.mktemp("untrained"))
  _, _, state, _ = build_training(config, config.data.num_classes)
  mngr = checkpoint.manager(workdir, 1)
  checkpoint.save(mngr, state, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return config, workdir


def test_predict_folder_of_mixed_sizes(untrained, tmp_path, caplog):
  config, workdir = untrained
  rng = np.random.default_rng(0)
  inputs = tmp_path / "in"
  (inputs / "sub").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(inputs / "small.png")
  Image.fromarray(rng.integers(0, 255, (130, 90, 3), np.uint8)).save(
      inputs / "sub" / "large.jpg", quality=90)
  Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(inputs / "grey.png")
  (inputs / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  (inputs / "notes.txt").write_text("not an image, not listed")
  config.mode = "predict"
  config.predict.input, config.predict.output = str(inputs), str(tmp_path / "out")
  with caplog.at_level(logging.WARNING):
    summary = predict.predict(config, workdir)
  assert summary["skipped"] == ["bad.jpg"]
  assert sorted(summary["written"]) == ["grey.png", "small.png", "sub/large.jpg"]
  assert any("bad.jpg" in r.getMessage() for r in caplog.records)
  out = tmp_path / "out"
  for rel, (h, w) in (("small.png", (40, 30)), ("sub/large.png", (130, 90)),
                      ("grey.png", (20, 20))):
    labels = np.asarray(Image.open(out / "labels" / rel))
    assert labels.shape == (h, w) and labels.max() < config.data.num_classes
    colour = Image.open(out / "color" / rel)
    assert colour.size == (w, h) and colour.mode == "RGB"
  assert not os.path.exists(out / "confidence") and not os.path.exists(out / "overlay")


def test_predict_needs_a_checkpoint(tmp_path):
  from advsemiseg_jax.config import load_config
  from conftest import ROOT
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  config.unlock()
  (tmp_path / "in").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "a.png")
  config.mode = "predict"
  config.predict.input, config.predict.output = str(tmp_path / "in"), str(tmp_path / "o")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    predict.predict(config, str(tmp_path / "empty"))
