"""Demo scenes, label splits and the deterministic tf.data streams."""
import numpy as np
import pytest

from advsemiseg_jax.config import base_config
from advsemiseg_jax.data import demo, ops, sources, splits, streams


def test_scenes_are_deterministic_and_well_formed():
  a, b = demo.scene(3, 5, 48), demo.scene(3, 5, 48)
  np.testing.assert_array_equal(a[0], b[0]); np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], demo.scene(3, 6, 48)[0])
  images, labels = demo.scenes(0, 0, 40, 48)
  assert images.shape == (40, 48, 48, 3) and images.dtype == np.uint8
  values = set(np.unique(labels))
  assert values <= set(range(demo.NUM_CLASSES)) | {255}
  assert values >= set(range(demo.NUM_CLASSES)) | {255}      # every class appears
  # The ignore band separates every object from the background.
  lab = labels[0].astype(int)
  horizontal = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] != 255) & (lab[:, :-1] != 255)
  assert not horizontal.any()


def test_labeled_split():
  lab, unl = splits.labeled_split(100, 0.125, seed=3)
  assert len(lab) == 12 and len(unl) == 88
  assert sorted(np.concatenate([lab, unl]).tolist()) == list(range(100))
  lab2, _ = splits.labeled_split(100, 0.125, seed=3)
  np.testing.assert_array_equal(lab, lab2)
  with pytest.raises(ValueError, match="labeled_fraction"):
    splits.labeled_split(100, 0.0, seed=0)


def _data_config():
  c = base_config().data
  c.demo.num_train, c.demo.num_val, c.demo.image_size = 12, 5, 40
  c.batch_size, c.crop_size, c.eval_size, c.eval_batch_size = 2, (32, 32), (40, 40), 2
  return c


def test_streams_are_deterministic_and_resume_mid_run():
  cfg = _data_config()
  source = sources.get_source(cfg)
  lab, unl = splits.labeled_split(12, 0.5, 0)
  full = streams.train_batches(source, cfg, lab, unl, seed=1)
  batches = [next(full) for _ in range(7)]
  resumed = streams.train_batches(source, cfg, lab, unl, seed=1, start_step=4)
  for i in range(4, 7):
    r = next(resumed)
    for k in batches[i]:
      np.testing.assert_array_equal(r[k], batches[i][k])
  b = batches[0]
  assert b["image"].shape == (2, 32, 32, 3) and b["label"].shape == (2, 32, 32)
  assert b["unlabeled_image"].shape == (2, 32, 32, 3) and b["gt_label"].shape == (2, 32, 32)
  other_seed = next(streams.train_batches(source, cfg, lab, unl, seed=2))
  assert not np.array_equal(other_seed["image"], b["image"])


def test_each_epoch_visits_every_labeled_image_once():
  cfg = _data_config()
  cfg.random_scale = cfg.random_mirror = False
  cfg.crop_size = (40, 40)
  source = sources.get_source(cfg)
  lab, unl = splits.labeled_split(12, 0.5, 0)
  it = streams.train_batches(source, cfg, lab, unl, seed=0, with_unlabeled=False,
                             with_gt=False)
  seen = [next(it)["label"] for _ in range(3)]           # 6 labeled = 3 batches of 2
  _, labels = demo.scenes(demo.TRAIN_SEED, 0, 12, 40)
  expected = {labels[i].astype(np.int32).tobytes() for i in lab}
  assert {x.tobytes() for x in np.concatenate(seen)} == expected


def test_eval_batches_cover_split_once_with_padding():
  cfg = _data_config()
  cfg.eval_size = (48, 44)
  source = sources.get_source(cfg)
  batches = list(streams.eval_batches(source, cfg))
  assert len(batches) == 3                               # 5 images, batch 2
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 0])
  last = batches[-1]
  assert np.all(last["label"][1] == 255)                 # filler example ignored
  assert np.all(batches[0]["label"][:, 40:, :] == 255)   # bottom padding ignored
  assert np.all(batches[0]["image"][:, :, 40:] == 0)     # right padding = mean colour


def test_augment_ops_joint_geometry():
  import tensorflow as tf
  image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
  label = (np.arange(20 * 30) % 7).reshape(20, 30).astype(np.uint8)
  seed = tf.constant([4, 2], tf.int64)
  img, lab = ops.train_augment(image, label, seed, (16, 16), scale=False, mirror=True)
  img, lab = img.numpy(), lab.numpy()
  norm = image.astype(np.float32) - np.array(ops.RGB_MEAN, np.float32)
  # Find the crop: the label and image must come from the same window/flip.
  found = False
  for flip in (False, True):
    src_i = norm[:, ::-1] if flip else norm
    src_l = label[:, ::-1] if flip else label
    for y in range(5):
      for x in range(15):
        if np.allclose(src_i[y:y + 16, x:x + 16], img):
          found = np.array_equal(src_l[y:y + 16, x:x + 16], lab)
  assert found
  small = np.zeros((8, 10, 3), np.uint8)
  img, lab = ops.train_augment(small, np.zeros((8, 10), np.uint8), seed, (16, 16),
                               scale=True, mirror=False)
  assert img.shape == (16, 16, 3) and lab.shape == (16, 16)
  assert (lab.numpy() == 255).any()                      # padding is ignored
