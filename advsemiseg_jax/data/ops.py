"""Preprocessing and augmentation ops shared by every dataset (tf.data).

Each op takes and returns tensors of one example; randomness comes from an
explicit stateless seed (shape [2] int), so a stream is a deterministic
function of (seed, element index) and a resumed run sees the same data.
Joint image/label geometry uses one draw for both.
"""
import tensorflow as tf

IGNORE_LABEL = 255
# The authors' code subtracts the BGR mean (104.01, 116.67, 122.68) from a BGR
# image and then reverses the channels: the network sees RGB minus this mean.
RGB_MEAN = (122.67891434, 116.66876762, 104.00698793)
SCALES = tuple(0.5 + k / 10 for k in range(12))  # 0.5, 0.6, ..., 1.6


def normalize(image):
  """uint8 RGB -> float32 RGB minus the per-channel mean (0..255 scale, no std)."""
  return tf.cast(image, tf.float32) - tf.constant(RGB_MEAN, tf.float32)


def split_seed(seed, n: int):
  """``n`` independent stateless seeds derived from ``seed``."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def resize(image, label, size):
  """Image bilinear, label nearest neighbour, to ``size`` = (h, w)."""
  image = tf.image.resize(image, size, method="bilinear")
  label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
  return image, label


def random_scale(image, label, seed, scales=SCALES):
  """Scales both by one factor drawn uniformly from ``scales``."""
  k = tf.random.stateless_uniform([], seed, 0, len(scales), dtype=tf.int32)
  factor = tf.gather(tf.constant(scales, tf.float32), k)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  size = tf.cast(hw * factor + 0.5, tf.int32)
  return resize(image, label, size)


def pad_to_at_least(image, label, size):
  """Pads bottom/right to at least ``size``: image with 0, label with 255.

  Apply after ``normalize``: a 0 pixel is then the mean colour, as in the
  authors' code.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ph, pw = tf.maximum(size[0] - h, 0), tf.maximum(size[1] - w, 0)
  image = tf.pad(image, [[0, ph], [0, pw], [0, 0]])
  label = tf.pad(label, [[0, ph], [0, pw]], constant_values=IGNORE_LABEL)
  return image, label


def random_crop(image, label, seed, size):
  """One ``size`` crop at the same random offset of image and label."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  seeds = split_seed(seed, 2)
  y = tf.random.stateless_uniform([], seeds[0], 0, h - size[0] + 1, tf.int32)
  x = tf.random.stateless_uniform([], seeds[1], 0, w - size[1] + 1, tf.int32)
  image = image[y:y + size[0], x:x + size[1]]
  label = label[y:y + size[0], x:x + size[1]]
  return (tf.ensure_shape(image, (size[0], size[1], 3)),
          tf.ensure_shape(label, (size[0], size[1])))


def random_mirror(image, label, seed):
  """Flips both left-right with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return (tf.cond(flip, lambda: image[:, ::-1], lambda: image),
          tf.cond(flip, lambda: label[:, ::-1], lambda: label))


def train_augment(image, label, seed, crop_size, scale: bool, mirror: bool):
  """The authors' training augmentation on one uint8 example.

  Optional random scale, normalise, pad to the crop (0 / 255), random crop,
  optional random mirror. Returns float32 image and int32 label.
  """
  seeds = split_seed(seed, 3)
  label = tf.cast(label, tf.int32)
  image = tf.cast(image, tf.float32)
  if scale:
    image, label = random_scale(image, label, seeds[0])
  image = image - tf.constant(RGB_MEAN, tf.float32)
  image, label = pad_to_at_least(image, label, crop_size)
  image, label = random_crop(image, label, seeds[1], crop_size)
  if mirror:
    image, label = random_mirror(image, label, seeds[2])
  return image, label


def eval_preprocess(image, label, size):
  """Normalise and pad bottom/right to the fixed evaluation ``size``."""
  image, label = pad_to_at_least(normalize(image), tf.cast(label, tf.int32), size)
  return (tf.ensure_shape(image[:size[0], :size[1]], (size[0], size[1], 3)),
          tf.ensure_shape(label[:size[0], :size[1]], (size[0], size[1])))
