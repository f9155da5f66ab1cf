"""Training and evaluation streams over file-based sources: bit-identical
batches after a simulated resume, the GT stream's no-padding rule, and
evaluation batches of a real val split."""
import itertools

import numpy as np
import pytest

from advsemiseg_jax.config import base_config
from advsemiseg_jax.data import fake, sources, splits, streams


def folder_config(root, **kw):
  c = base_config().data
  c.name, c.root, c.num_classes = "folder", str(root), 4
  c.batch_size, c.crop_size = 2, (32, 32)
  c.labeled_fraction = 0.5
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def take(it, n):
  return list(itertools.islice(it, n))


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_resumed_stream_is_bit_identical(tmp_path, cache):
  fake.write_folder(tmp_path, num_train=5, num_val=1, size=(40, 60))
  cfg = folder_config(tmp_path, cache=cache, random_scale=True, random_mirror=True)
  src = sources.get_source(cfg)
  lab, unl = splits.make_split(src.splits["train"], cfg)
  full = take(streams.train_batches(src, cfg, lab, unl, seed=7), 6)
  resumed = take(streams.train_batches(src, cfg, lab, unl, seed=7, start_step=4), 2)
  for a, b in zip(full[4:], resumed):
    assert a.keys() == b.keys() == {"image", "label", "unlabeled_image", "gt_label"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Different steps and seeds do differ.
  assert not np.array_equal(full[0]["image"], full[1]["image"])
  other = take(streams.train_batches(src, cfg, lab, unl, seed=8), 1)
  assert not np.array_equal(other[0]["image"], full[0]["image"])


def test_gt_stream_rescales_instead_of_padding(tmp_path):
  fake.write_folder(tmp_path, num_train=4, num_val=1, size=(24, 30))  # < the crop
  cfg = folder_config(tmp_path, random_scale=False, random_mirror=False)
  src = sources.get_source(cfg)
  lab, unl = splits.make_split(src.splits["train"], cfg)
  batch = take(streams.train_batches(src, cfg, lab, unl, seed=0), 1)[0]
  assert batch["gt_label"].shape == (2, 32, 32)
  assert (batch["label"] == 255).any()         # the labeled stream pads
  assert not (batch["gt_label"] == 255).any()  # the GT stream resizes
  cfg.gt_rescale = False
  batch = take(streams.train_batches(src, cfg, lab, unl, seed=0), 1)[0]
  assert (batch["gt_label"] == 255).any()


def test_eval_batches_cover_a_file_val_split(tmp_path):
  fake.write_folder(tmp_path, num_train=2, num_val=3, size=(40, 60))
  cfg = folder_config(tmp_path, eval_size=(48, 64), eval_batch_size=2, threads=1)
  src = sources.get_source(cfg)
  batches = list(streams.eval_batches(src, cfg))
  assert len(batches) == 2
  assert batches[0]["image"].shape == (2, 48, 64, 3)
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]),
                                [1, 1, 1, 0])
  assert (batches[1]["label"][1] == 255).all()
  assert (batches[0]["label"][:, 40:] == 255).all()
  assert (batches[0]["label"][:, :40, :60] != 255).any()


@pytest.mark.parametrize("with_unlabeled,with_gt", [(True, True), (False, False)])
def test_train_batch_spec_is_what_the_stream_yields(tmp_path, with_unlabeled, with_gt):
  """``train_batch_spec``, from which main.py compiles the step before any
  batch exists, names the keys, shapes and dtypes of ``train_batches``'s
  batches (one process: the global batch is the local one)."""
  fake.write_folder(tmp_path, num_train=4, num_val=1, size=(40, 60))
  cfg = folder_config(tmp_path, crop_size=(24, 40))
  src = sources.get_source(cfg)
  lab, unl = splits.make_split(src.splits["train"], cfg)
  batch = take(streams.train_batches(src, cfg, lab, unl, seed=0, with_unlabeled=with_unlabeled,
                                     with_gt=with_gt), 1)[0]
  spec = streams.train_batch_spec(cfg, with_unlabeled=with_unlabeled, with_gt=with_gt)
  assert spec.keys() == batch.keys()
  for key, value in batch.items():
    assert (spec[key].shape, spec[key].dtype) == (value.shape, value.dtype), key
