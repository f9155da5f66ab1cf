"""configs/voc.py: variants, and the quick variant end to end on a fake VOC
tree of real JPEGs and PNG labels."""
import json

import pytest

from advsemiseg_jax.data import fake
from advsemiseg_jax.data.files import DataError
from configs import voc


def test_voc_variants():
  c = voc.get_config()
  assert (c.data.labeled_fraction, c.data.batch_size, c.num_steps) == (0.125, 10, 20000)
  assert tuple(c.data.crop_size) == (321, 321) and c.optim.lr_g == 2.5e-4
  assert c.loss.lambda_semi == 0.1 and c.loss.lambda_adv == 0.01
  c = voc.get_config("1/2,adv")
  assert c.data.labeled_fraction == 0.5 and c.loss.lambda_semi == 0.0
  assert c.loss.lambda_adv == 0.01
  c = voc.get_config("full,baseline,noaug")
  assert c.data.labeled_fraction == 1.0 and c.loss.lambda_adv == 0.0
  assert not c.data.random_scale and not c.data.random_mirror
  assert voc.get_config("full").loss.lambda_semi_adv == 0.0
  for bad in ("1/8,1/4", "baseline,adv", "1/3"):
    with pytest.raises(ValueError):
      voc.get_config(bad)


def test_voc_quick_trains_and_evaluates(tmp_path):
  from advsemiseg_jax import train
  root = fake.write_voc(tmp_path / "data", num_train=8, num_val=2)
  c = voc.get_config("quick")
  c.data.root = str(root)
  c.num_steps, c.checkpoint_every, c.loss.semi_start = 4, 2, 2  # keep it short
  c.data.eval_size = (64, 64)  # the fake images are at most 42x60
  work = tmp_path / "work"
  results = train.train_and_evaluate(c, str(work))
  assert list(results["per_class_iou"]) == list(
      ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
       "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
       "pottedplant", "sheep", "sofa", "train", "tvmonitor"))
  assert json.load(open(work / "results.json"))["step"] == 4
  split = json.load(open(work / "split.json"))
  assert split["num_labeled"] == 1 and split["num_unlabeled"] == 7


def test_voc_quick_bad_label_stops_before_training(tmp_path):
  from advsemiseg_jax import train
  import numpy as np
  from PIL import Image
  root = fake.write_voc(tmp_path / "data", num_train=4, num_val=1)
  bad = f"{root}/SegmentationClassAug/2007_000002.png"
  Image.fromarray(np.full((40, 60), 21, np.uint8)).save(bad)
  c = voc.get_config("quick")
  c.data.root = str(root)
  with pytest.raises(DataError, match=rf"{bad}: value\(s\) \[21\]"):
    train.train_and_evaluate(c, str(tmp_path / "work"))
  assert not (tmp_path / "work" / "checkpoints").exists()
