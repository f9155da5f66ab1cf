"""The preprocessing and augmentation ops, each eagerly and inside tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from advsemiseg_jax.data import ops


def in_tf_data(fn, *args):
  """``fn(*args)`` run inside a tf.data map (graph mode), as numpy."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.constant(a) for a in args))
  out = next(iter(ds.map(lambda *xs: fn(*xs))))
  return tf.nest.map_structure(lambda t: t.numpy(), out)


def both(fn, *args):
  """Eager and tf.data results of ``fn``; asserts they are identical."""
  eager = tf.nest.map_structure(lambda t: t.numpy(),
                                fn(*(tf.constant(a) for a in args)))
  graph = in_tf_data(fn, *args)
  tf.nest.map_structure(np.testing.assert_array_equal, eager, graph)
  return eager


def example(h=30, w=40, seed=0):
  """An image whose red channel equals the label, so alignment is checkable."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 21, size=(h, w)).astype(np.uint8)
  image = np.stack([label * 10, rng.integers(0, 255, (h, w)),
                    rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
  return image, label


SEED = np.array([3, 7], np.int64)


def test_normalize_subtracts_rgb_mean_without_std():
  image = np.array([[[122, 117, 104], [255, 0, 0]]], np.uint8)
  out = both(ops.normalize, image)
  np.testing.assert_allclose(out[0, 0], [122 - 122.67891434, 117 - 116.66876762,
                                         104 - 104.00698793], atol=1e-4)
  np.testing.assert_allclose(out[0, 1], [255 - 122.67891434, -116.66876762,
                                         -104.00698793], atol=1e-4)


def test_resize_fixed_is_half_pixel_bilinear_and_nearest_uint8():
  image = np.zeros((2, 4, 3), np.uint8)
  image[..., 0] = [0, 100, 200, 250]
  label = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint8)
  out_image, out_label = both(lambda i, l: ops.resize_fixed(i, l, (1, 2)), image, label)
  assert out_image.dtype == np.uint8 and out_image.shape == (1, 2, 3)
  # Half-pixel centres (OpenCV INTER_LINEAR): output x=0 samples input 0.5.
  np.testing.assert_array_equal(out_image[0, :, 0], [50, 225])
  assert out_label.dtype == np.uint8 and out_label.shape == (1, 2)
  assert set(out_label.ravel()) <= set(label.ravel())


def test_resize_fixed_to_own_size_is_identity():
  image, label = example()
  out_image, out_label = both(lambda i, l: ops.resize_fixed(i, l, (30, 40)), image, label)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


def test_random_scale_draws_from_the_scale_set():
  image, label = example()
  sizes = set()
  for s in range(20):
    seed = np.array([s, 1], np.int64)
    out_image, out_label = both(
        lambda i, l, sd: ops.random_scale(tf.cast(i, tf.float32), l, sd),
        image, label, seed)
    h, w = out_label.shape
    assert out_image.shape[:2] == (h, w)
    assert any((h, w) == (int(30 * f + 0.5), int(40 * f + 0.5)) for f in ops.SCALES)
    assert set(np.unique(out_label)) <= set(np.unique(label))
    sizes.add((h, w))
  assert len(sizes) > 3


def test_pad_to_at_least_pads_bottom_right_with_zero_and_ignore():
  image = np.ones((3, 4, 3), np.float32)
  label = np.ones((3, 4), np.int32)
  out_image, out_label = both(lambda i, l: ops.pad_to_at_least(i, l, (5, 4)),
                              image, label)
  assert out_image.shape == (5, 4, 3)
  np.testing.assert_array_equal(out_image[:3], 1)
  np.testing.assert_array_equal(out_image[3:], 0)
  np.testing.assert_array_equal(out_label[3:], 255)
  np.testing.assert_array_equal(out_label[:3], 1)


def test_random_crop_is_aligned_and_inside():
  image, label = example()
  out_image, out_label = both(lambda i, l, s: ops.random_crop(i, l, s, (16, 8)),
                              image, label, SEED)
  assert out_image.shape == (16, 8, 3)
  np.testing.assert_array_equal(out_image[..., 0], out_label * 10)
  hits = [(y, x) for y in range(15) for x in range(33)
          if np.array_equal(label[y:y + 16, x:x + 8], out_label)]
  assert hits


def test_random_mirror_flips_image_and_label_together():
  image, label = example()
  flipped = 0
  for s in range(16):
    out_image, out_label = both(ops.random_mirror, image, label,
                                np.array([s, 2], np.int64))
    np.testing.assert_array_equal(out_image[..., 0], out_label * 10)
    if np.array_equal(out_label, label[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out_label, label)
  assert 0 < flipped < 16


@pytest.mark.parametrize("scale,mirror", [(False, False), (True, True)])
def test_train_augment_shapes_dtypes_and_determinism(scale, mirror):
  image, label = example()
  fn = lambda i, l, s: ops.train_augment(i, l, s, (32, 32), scale, mirror)
  out_image, out_label = both(fn, image, label, SEED)
  assert out_image.shape == (32, 32, 3) and out_image.dtype == np.float32
  assert out_label.shape == (32, 32) and out_label.dtype == np.int32
  again = both(fn, image, label, SEED)
  np.testing.assert_array_equal(again[0], out_image)
  if not scale:  # 30x40 < 32 rows: the bottom rows are padding
    assert (out_label == 255).any()


def authors_gt_size(hw, factors, crop, scale, tries=10):
  """VOCGTDataSet's loop in plain Python (sizes only; factors compound)."""
  cur = hw
  for attempt in range(tries):
    if scale:
      cur = tuple(int(v * factors[attempt] + 0.5) for v in cur)
    if cur[0] >= crop[0] and cur[1] >= crop[1]:
      return cur
  return crop


@pytest.mark.parametrize("hw", [(30, 40), (100, 120), (200, 60), (10, 10)])
@pytest.mark.parametrize("scale", [False, True])
def test_gt_rescale_size_matches_the_authors_loop(hw, scale):
  crop = (64, 48)
  for s in range(6):
    seed = np.array([s, 5], np.int64)
    got = both(lambda h, sd: ops.gt_rescale_size(h, sd, crop, scale),
               np.array(hw, np.int32), seed)
    ks = tf.random.stateless_uniform([10], seed, 0, len(ops.SCALES),
                                     dtype=tf.int32).numpy()
    factors = [np.float32(ops.SCALES[k]) for k in ks]
    assert tuple(got) == authors_gt_size(hw, factors, crop, scale)


def test_gt_augment_never_pads():
  image, label = example(20, 20)  # smaller than the crop
  for scale in (False, True):
    fn = lambda i, l, s: ops.gt_augment(i, l, s, (32, 32), scale, True)
    out_image, out_label = both(fn, image, label, SEED)
    assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
    assert not (out_label == 255).any()
    assert set(np.unique(out_label)) <= set(np.unique(label))


def test_eval_preprocess_pads_to_fixed_size():
  image, label = example(30, 40)
  out_image, out_label = both(lambda i, l: ops.eval_preprocess(i, l, (32, 48)),
                              image, label)
  assert out_image.shape == (32, 48, 3)
  np.testing.assert_array_equal(out_label[:30, :40], label)
  np.testing.assert_array_equal(out_label[30:], 255)
  np.testing.assert_array_equal(out_image[30:], 0)
