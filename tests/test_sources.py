"""Dataset sources on small real files: VOC (aug and palette labels),
Cityscapes (the id table), plain folders (CamVid), TFDS (mocked), and the
errors a user sees for bad input."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from advsemiseg_jax.config import base_config
from advsemiseg_jax.data import fake, sources
from advsemiseg_jax.data.files import DataError

CAMVID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "camvid_small")


def data_config(name, root, **kw):
  c = base_config().data
  c.name, c.root = name, str(root)
  c.num_classes = {"voc": 21, "cityscapes": 19}.get(name, c.num_classes)
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def load(split, i):
  ex = split.load(tf.constant(i, tf.int64))
  return ex["image"].numpy(), ex["label"].numpy()


# ---------------------------------------------------------------- VOC


def test_voc_devkit_or_voc2012_root_and_default_train_list(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=5, num_val=2)
  for root in (voc, os.path.dirname(voc)):
    src = sources.get_source(data_config("voc", root))
    assert src.num_classes == 21 and src.class_names[15] == "person"
    # Sorted ids with an aug label, minus the val ids.
    assert src.splits["train"].ids == tuple(f"2007_{i:06d}" for i in range(5))
    assert src.splits["val"].ids == ("2007_000005", "2007_000006")
    assert src.splits["val"].max_shape == (42, 60)


def test_voc_reads_palette_png_indices_not_colours(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1, palette_labels=3)
  aug = [np.asarray(Image.open(os.path.join(voc, "SegmentationClassAug",
                                            f"2007_{i:06d}.png"))) for i in range(4)]
  shutil.rmtree(os.path.join(voc, "SegmentationClassAug"))
  assert Image.open(os.path.join(voc, "SegmentationClass", "2007_000000.png")).mode == "P"
  src = sources.get_source(data_config("voc", voc, cache="none"))
  assert src.splits["train"].size == 3  # VOC's own labels minus val
  for i in range(3):
    _, label = load(src.splits["train"], i)
    np.testing.assert_array_equal(label, aug[i])
  assert set(np.unique(label)) - {255} <= set(range(21))


def test_voc_explicit_list_file(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=5, num_val=2)
  with open(tmp_path / "train_aug.txt", "w") as f:
    f.write("/JPEGImages/2007_000003.jpg /SegmentationClassAug/2007_000003.png\n"
            "2007_000001\n")
  src = sources.get_source(data_config("voc", voc, train_list=str(tmp_path / "train_aug.txt")))
  assert src.splits["train"].ids == ("2007_000003", "2007_000001")


def test_voc_missing_root_names_path_and_layout(tmp_path):
  with pytest.raises(DataError, match="(?s)nowhere.*Expected layout.*JPEGImages"):
    sources.get_source(data_config("voc", tmp_path / "nowhere"))
  with pytest.raises(DataError, match="(?s)no JPEGImages.*Expected layout"):
    sources.get_source(data_config("voc", tmp_path))


def test_voc_image_without_label_is_named(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=2)
  os.remove(os.path.join(voc, "SegmentationClassAug", "2007_000004.png"))
  os.remove(os.path.join(voc, "SegmentationClass", "2007_000004.png"))
  with pytest.raises(DataError, match="2007_000004.jpg has no label"):
    sources.get_source(data_config("voc", voc))


def test_voc_label_without_image_is_named(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  os.remove(os.path.join(voc, "JPEGImages", "2007_000001.jpg"))
  with pytest.raises(DataError, match="JPEGImages/2007_000001.jpg"):
    sources.get_source(data_config("voc", voc))


def corrupt(path):
  with open(path, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG at all")


def test_corrupt_image_is_named_before_training(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  bad = os.path.join(voc, "JPEGImages", "2007_000002.jpg")
  corrupt(bad)
  for cache in ("memory", "none"):  # decoding, or the header scan
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
      sources.get_source(data_config("voc", voc, cache=cache))


def test_truncated_image_is_named_cached_or_streamed(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  bad = os.path.join(voc, "JPEGImages", "2007_000001.jpg")
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[:len(data) // 2])  # the header is intact
  with pytest.raises(DataError, match=f"cannot read image {bad}"):
    sources.get_source(data_config("voc", voc, cache="memory"))
  src = sources.get_source(data_config("voc", voc, cache="none"))
  load(src.splits["train"], 0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=f"cannot read image {bad}"):
    load(src.splits["train"], 1)


def test_streamed_bad_label_fails_at_read_time_with_file_and_value(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  bad = os.path.join(voc, "SegmentationClassAug", "2007_000001.png")
  label = np.asarray(Image.open(bad)).copy()
  label[5, 5] = 30
  Image.fromarray(label).save(bad)
  src = sources.get_source(data_config("voc", voc, cache="none"))
  load(src.splits["train"], 0)
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf"{bad}: value\(s\) \[30\]"):
    load(src.splits["train"], 1)
  with pytest.raises(DataError, match=rf"label file {bad}: value\(s\) \[30\]"):
    sources.get_source(data_config("voc", voc, cache="memory"))


def test_label_size_mismatch_is_named(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  bad = os.path.join(voc, "SegmentationClassAug", "2007_000000.png")
  Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
  with pytest.raises(DataError, match=f"label {bad} is 10x12 but its image .*2007_000000.jpg"):
    sources.get_source(data_config("voc", voc))


def test_rgb_label_is_refused(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  bad = os.path.join(voc, "SegmentationClassAug", "2007_000000.png")
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(bad)
  with pytest.raises(DataError, match=f"{bad} has mode 'RGB'"):
    sources.get_source(data_config("voc", voc))


def test_skip_bad_files_counts_and_keeps_listed_ids(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=4, num_val=1)
  corrupt(os.path.join(voc, "JPEGImages", "2007_000001.jpg"))
  for cache in ("memory", "none"):
    src = sources.get_source(data_config("voc", voc, cache=cache, skip_bad_files=True))
    train = src.splits["train"]
    assert train.size == 3 and train.skipped == ("2007_000001",)
    assert train.ids == ("2007_000000", "2007_000002", "2007_000003")
    assert train.all_ids == tuple(f"2007_{i:06d}" for i in range(4))
    image, _ = load(train, 1)  # 2007_000002, not the bad one
    assert image.shape == (42, 60, 3)


def test_cached_and_streamed_examples_are_identical(tmp_path):
  voc = fake.write_voc(tmp_path, num_train=3, num_val=1)
  a = sources.get_source(data_config("voc", voc, cache="memory"))
  b = sources.get_source(data_config("voc", voc, cache="none"))
  for i in range(3):
    for x, y in zip(load(a.splits["train"], i), load(b.splits["train"], i)):
      np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_label_id_table():
  lut = sources.cityscapes_lut()
  expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
              23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
  for label_id in range(34):
    assert lut[label_id] == expected.get(label_id, 255), label_id
  assert lut[255] == 255 and (lut[34:255] < 0).all()
  assert len(sources.CITYSCAPES_CLASSES) == 19


def test_cityscapes_sorted_ids_mapping_and_resize(tmp_path):
  fake.write_cityscapes(tmp_path, num_train=4, num_val=2, size=(32, 64))
  label_path = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
  raw = np.asarray(Image.open(label_path))
  src = sources.get_source(data_config("cityscapes", tmp_path, cache="none"))
  train = src.splits["train"]
  assert train.ids == tuple(sorted(train.ids))
  assert train.ids[0] == "aachen/aachen_000000_000019"
  _, label = load(train, 0)
  np.testing.assert_array_equal(label, sources.cityscapes_lut()[raw])
  small = sources.get_source(data_config("cityscapes", tmp_path, resize=(16, 32),
                                         eval_resize=(8, 16)))
  image, label = load(small.splits["train"], 0)
  assert image.shape == (16, 32, 3) and label.shape == (16, 32)
  assert small.splits["val"].max_shape == (8, 16)
  assert set(np.unique(label)) <= set(np.unique(sources.cityscapes_lut()[raw]))


def test_cityscapes_errors_name_files(tmp_path):
  with pytest.raises(DataError, match="(?s)leftImg8bit/train.*Expected layout"):
    sources.get_source(data_config("cityscapes", tmp_path))
  fake.write_cityscapes(tmp_path, num_train=2, num_val=1, size=(16, 32))
  label = tmp_path / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png"
  Image.fromarray(np.full((16, 32), 40, np.uint8)).save(label)
  with pytest.raises(DataError, match=rf"{label}: value\(s\) \[40\]"):
    sources.get_source(data_config("cityscapes", tmp_path))
  os.remove(label)
  with pytest.raises(DataError, match="bremen_000001_000019_leftImg8bit.png has no label"):
    sources.get_source(data_config("cityscapes", tmp_path))


# ---------------------------------------------------------------- folders


def test_folder_source_with_void_mapping(tmp_path):
  fake.write_folder(tmp_path, num_train=3, num_val=2, num_classes=4, void=4)
  cfg = data_config("folder", tmp_path, num_classes=4, label_map="4:255",
                    class_names=("a", "b", "c", "d"))
  src = sources.get_source(cfg)
  assert src.class_names == ("a", "b", "c", "d")
  assert src.splits["train"].ids[0] == "images/train_000.png"
  raw = np.asarray(Image.open(tmp_path / "labels/train_000.png"))
  _, label = load(src.splits["train"], 0)
  np.testing.assert_array_equal(label, np.where(raw == 4, 255, raw))
  cfg.label_map = ""
  with pytest.raises(DataError, match=r"labels/train_00\d.png: value\(s\) \[4\]"):
    sources.get_source(cfg)


def test_folder_missing_list_file_shows_layout(tmp_path):
  cfg = data_config("folder", tmp_path, num_classes=4)
  with pytest.raises(DataError, match="(?s)train.txt.*Expected layout"):
    sources.get_source(cfg)


def test_camvid_small_folder():
  if not os.path.isdir(CAMVID):
    pytest.skip(f"{CAMVID} is absent (test data of the development machine)")
  names = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
           "Fence", "Car", "Pedestrian", "Bicyclist")
  cfg = data_config("folder", CAMVID, num_classes=11, class_names=names,
                    label_map="11:255", train_list="train.txt", val_list="val.txt",
                    cache="none")
  src = sources.get_source(cfg)
  assert src.splits["train"].size == 367 and src.splits["val"].size == 101
  assert src.splits["train"].max_shape == (180, 240)
  seen = set()
  for i in (0, 100, 366):
    image, label = load(src.splits["train"], i)
    assert image.shape == (180, 240, 3) and label.shape == (180, 240)
    seen |= set(np.unique(label).tolist())
  assert seen <= set(range(11)) | {255} and len(seen) > 5


# ---------------------------------------------------------------- TFDS


def fake_pets(num=4):
  """A mock ``_as_dataset``: masks 1 (pet), 2 (background), 3 (border)."""

  def as_dataset(self, *args, **kwargs):
    def gen():
      rng = np.random.default_rng(0)
      for i in range(num):
        h, w = 20 + i, 30
        yield {"image": rng.integers(0, 255, (h, w, 3)).astype(np.uint8),
               "segmentation_mask": rng.integers(1, 4, (h, w, 1)).astype(np.uint8)}
    return tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec((None, None, 3), tf.uint8),
        "segmentation_mask": tf.TensorSpec((None, None, 1), tf.uint8)})

  return as_dataset


def tfds_config(tmp_path):
  cfg = data_config("tfds", tmp_path, num_classes=2, class_names=("pet", "background"),
                    label_map="1:0,2:1,3:255")
  cfg.tfds.name, cfg.tfds.val_split = "oxford_iiit_pet", "test"
  return cfg


def test_tfds_source_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(as_dataset_fn=fake_pets(4)):
    src = sources.get_source(tfds_config(tmp_path))
  assert src.splits["train"].size == 4 and src.splits["val"].max_shape == (23, 30)
  image, label = load(src.splits["train"], 2)
  assert image.shape == (22, 30, 3) and label.shape == (22, 30)
  assert set(np.unique(label)) == {0, 1, 255}


def test_tfds_bad_mask_values_are_named(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=2):  # random 0..255 masks
    with pytest.raises(DataError, match="TFDS oxford_iiit_pet train example 0"):
      sources.get_source(tfds_config(tmp_path))


def test_tfds_missing_feature_is_named(tmp_path):
  import tensorflow_datasets as tfds
  cfg = tfds_config(tmp_path)
  cfg.tfds.label_key = "mask"
  with tfds.testing.mock_data(as_dataset_fn=fake_pets(2)):
    with pytest.raises(DataError, match="no feature 'mask'"):
      sources.get_source(cfg)
