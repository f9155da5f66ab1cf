"""configs/cityscapes.py: variants, and the quick variant end to end on a
fake Cityscapes tree of real PNGs."""
import json

from advsemiseg_jax.data import fake
from configs import cityscapes


def test_cityscapes_variants():
  c = cityscapes.get_config()
  assert tuple(c.data.resize) == tuple(c.data.crop_size) == (512, 1024)
  assert (c.data.batch_size, c.num_steps, c.model.bn_mode) == (2, 40000, "frozen")
  assert not c.data.random_scale and c.data.labeled_fraction == 0.125
  c = cityscapes.get_config("fullres,1/4")
  assert tuple(c.data.eval_resize) == () and tuple(c.data.eval_size) == (1024, 2048)
  assert c.data.labeled_fraction == 0.25


def test_cityscapes_quick_trains_and_evaluates(tmp_path):
  from advsemiseg_jax import train
  root = fake.write_cityscapes(tmp_path / "data", num_train=8, num_val=2,
                               size=(128, 256))
  c = cityscapes.get_config("quick")
  c.data.root = str(root)
  c.num_steps, c.checkpoint_every, c.loss.semi_start = 4, 2, 2  # keep it short
  results = train.train_and_evaluate(c, str(tmp_path / "work"))
  assert list(results["per_class_iou"])[:3] == ["road", "sidewalk", "building"]
  assert len(results["per_class_iou"]) == 19
  assert json.load(open(tmp_path / "work" / "results.json"))["step"] == 4
