"""Fuzzing the input side: odd image files through the folder source and the
training stream give either the right batch or a DataError naming the file;
never a TF-internal error, a hang or a silently wrong label."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from advsemiseg_jax.config import base_config
from advsemiseg_jax.data import ops, sources, streams
from advsemiseg_jax.data.files import DataError

CROP = 32
NUM_CLASSES = 4
FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# (PIL mode written, file format)
IMAGE_KINDS = [("L", "png"), ("L", "jpg"), ("RGB", "png"), ("RGB", "jpg"),
               ("RGBA", "png"), ("LA", "png"), ("P", "png"), ("I;16", "png"),
               ("CMYK", "jpg"), ("1", "png")]


def _config(root):
  c = base_config()
  c.data.name, c.data.root, c.data.num_classes = "folder", str(root), NUM_CLASSES
  c.data.crop_size, c.data.eval_size = (CROP, CROP), (CROP, CROP)
  c.data.batch_size = 1
  c.data.random_scale = c.data.random_mirror = False
  c.data.threads = 1
  return c.data


def _write_image(path, rgb, mode, fmt):
  """Writes ``rgb`` (uint8 HxWx3) as ``mode``; returns the RGB the reader
  must produce (decoded back for lossy JPEG)."""
  if mode == "I;16":  # 16-bit grey: 8-bit values scaled to 0..65535 plus noise.
    grey16 = rgb[..., 0].astype(np.uint16) * 257 + (rgb[..., 1] % 100).astype(np.uint16)
    Image.fromarray(grey16).save(path)
    expected = ((grey16.astype(np.int64) + 128) // 257).astype(np.uint8)
    return np.repeat(expected[..., None], 3, -1)
  img = Image.fromarray(rgb).convert(mode)
  img.save(path, "JPEG" if fmt == "jpg" else "PNG")
  if fmt == "jpg":
    return np.asarray(Image.open(path).convert("RGB"))
  return np.asarray(img.convert("RGB"))


def _dataset(root, image_rgb, mode, fmt, label, label_mode="L"):
  os.makedirs(root / "images", exist_ok=True)
  os.makedirs(root / "labels", exist_ok=True)
  image_path = root / "images" / f"x.{fmt}"
  expected = _write_image(str(image_path), image_rgb, mode, fmt)
  label_path = root / "labels" / "x.png"
  if label_mode == "I;16":
    Image.fromarray(label.astype(np.uint16)).save(label_path)
  elif label_mode == "P":
    img = Image.fromarray(label.astype(np.uint8), "P")
    img.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    img.save(label_path)
  else:
    Image.fromarray(label.astype(np.uint8), label_mode).save(label_path)
  for name in ("train.txt", "val.txt"):
    (root / name).write_text("x\n")
  return str(image_path), str(label_path), expected


def _one_batch(data_config):
  source = sources.get_source(data_config)
  batches = streams.train_batches(source, data_config, [0], [], seed=0,
                                  with_unlabeled=False, with_gt=False)
  return next(batches)


def _window_of(crop, padded):
  """Whether ``crop`` is some CROPxCROP window of ``padded``."""
  h, w = padded.shape[:2]
  return any(np.array_equal(crop, padded[y:y + CROP, x:x + CROP])
             for y in range(h - CROP + 1) for x in range(w - CROP + 1))


def _padded(image, label):
  """The reference: image minus the mean and label, padded bottom/right to the
  crop with 0 / 255 (the authors' rule), as float32 / int32."""
  h, w = label.shape
  ph, pw = max(CROP - h, 0), max(CROP - w, 0)
  image = image.astype(np.float32) - np.asarray(ops.RGB_MEAN, np.float32)
  return (np.pad(image, ((0, ph), (0, pw), (0, 0))),
          np.pad(label.astype(np.int32), ((0, ph), (0, pw)), constant_values=255))


@FUZZ
@given(size=st.tuples(st.integers(1, 70), st.integers(1, 70)),
       kind=st.sampled_from(IMAGE_KINDS),
       label_mode=st.sampled_from(["L", "P", "I;16"]),
       seed=st.integers(0, 2**16))
def test_any_readable_image_gives_the_right_batch(tmp_path_factory, size, kind, label_mode,
                                                  seed):
  root = tmp_path_factory.mktemp("fuzz")
  rng = np.random.default_rng(seed)
  h, w = size
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  values = np.array(list(range(NUM_CLASSES)) + [255])
  label = values[rng.integers(0, len(values), (h, w))]
  _, _, expected = _dataset(root, rgb, *kind, label, label_mode)
  batch = _one_batch(_config(root))
  assert batch["image"].shape == (1, CROP, CROP, 3)
  assert batch["label"].shape == (1, CROP, CROP)
  image, labels = _padded(expected, label)
  # The same window of image and label: search over the label's offsets.
  h2, w2 = labels.shape
  hits = [(y, x) for y in range(h2 - CROP + 1) for x in range(w2 - CROP + 1)
          if np.array_equal(batch["label"][0], labels[y:y + CROP, x:x + CROP])]
  assert hits, "the label crop is no window of the written label"
  assert any(np.allclose(batch["image"][0], image[y:y + CROP, x:x + CROP], atol=1e-4)
             for y, x in hits)


BAD_KINDS = ("truncated_jpeg", "stray_label_value", "label_16bit_too_large",
             "label_size", "label_rgb", "garbage_png", "empty_file")


@FUZZ
@given(bad=st.sampled_from(BAD_KINDS),
       size=st.tuples(st.integers(8, 60), st.integers(8, 60)),
       cut=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_bad_files_give_a_data_error_naming_the_file(tmp_path_factory, bad, size, cut,
                                                     seed):
  root = tmp_path_factory.mktemp("bad")
  rng = np.random.default_rng(seed)
  h, w = size
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label = rng.integers(0, NUM_CLASSES, (h, w))
  fmt = "jpg" if bad == "truncated_jpeg" else "png"
  image_path, label_path, _ = _dataset(root, rgb, "RGB", fmt, label)
  named = label_path
  if bad == "truncated_jpeg":
    data = open(image_path, "rb").read()
    keep = int(cut * (len(data) - 2))  # at least the end-of-image marker goes
    open(image_path, "wb").write(data[:keep])
    named = image_path
  elif bad == "stray_label_value":
    label[rng.integers(h), rng.integers(w)] = rng.integers(NUM_CLASSES, 255)
    Image.fromarray(label.astype(np.uint8)).save(label_path)
  elif bad == "label_16bit_too_large":
    label = label.astype(np.uint16)
    label[0, 0] = rng.integers(256, 65536)
    Image.fromarray(label).save(label_path)
  elif bad == "label_size":
    Image.fromarray(label[:-1].astype(np.uint8)).save(label_path)
  elif bad == "label_rgb":
    Image.fromarray(np.repeat(label[..., None], 3, -1).astype(np.uint8)).save(label_path)
  elif bad == "garbage_png":
    open(image_path, "wb").write(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    named = image_path
  else:
    open(label_path, "wb").close()
  try:
    _one_batch(_config(root))
  except DataError as e:
    assert named in str(e), str(e)
  else:
    # Only a JPEG cut after its last scan can still decode; it must be whole.
    assert bad == "truncated_jpeg", bad
    np.testing.assert_array_equal(np.asarray(Image.open(image_path).convert("RGB")),
                                  _decoded_original(rgb))


def _decoded_original(rgb):
  import io
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, "JPEG")
  return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_bad_label_named_in_the_stream_without_cache(tmp_path, mode):
  """With data.cache=none the file is read inside tf.data: the failure still
  carries the file name and the value."""
  import tensorflow as tf
  label = np.zeros((40, 40), np.int64)
  label[3, 3] = 7
  _, label_path, _ = _dataset(tmp_path, np.zeros((40, 40, 3), np.uint8), "RGB", "png",
                              label)
  config = _config(tmp_path)
  config.cache = mode
  errors = (DataError, tf.errors.InvalidArgumentError)
  with pytest.raises(errors, match=rf"{label_path}: value\(s\) \[7\]"):
    _one_batch(config)
