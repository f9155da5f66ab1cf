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


def _normalize_crop_mirror(image, label, seeds, crop_size, mirror: bool):
  """The tail shared by the training and GT augmentations: subtract the mean,
  pad to the crop (0 / 255), random crop with ``seeds[1]``, optional mirror
  with ``seeds[2]``."""
  image = image - tf.constant(RGB_MEAN, tf.float32)
  image, label = pad_to_at_least(image, label, crop_size)
  image, label = random_crop(image, label, seeds[1], crop_size)
  if mirror:
    image, label = random_mirror(image, label, seeds[2])
  return image, label


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
  return _normalize_crop_mirror(image, label, seeds, crop_size, mirror)


def eval_preprocess(image, label, size):
  """Normalise and pad bottom/right to the fixed evaluation ``size``."""
  image, label = pad_to_at_least(normalize(image), tf.cast(label, tf.int32), size)
  return (tf.ensure_shape(image[:size[0], :size[1]], (size[0], size[1], 3)),
          tf.ensure_shape(label[:size[0], :size[1]], (size[0], size[1])))


def resize_fixed(image, label, size):
  """Resizes a uint8 example to exactly ``size`` = (h, w), keeping uint8.

  Image bilinear with half-pixel centres (OpenCV's INTER_LINEAR, no
  antialiasing), rounded back to uint8 as ``cv2.resize`` does; label nearest.
  The Cityscapes setting resizes every image to (512, 1024) this way.
  """
  image, label = resize(tf.cast(image, tf.float32), label, size)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return (tf.ensure_shape(image, (size[0], size[1], 3)),
          tf.ensure_shape(tf.cast(label, tf.uint8), (size[0], size[1])))


def gt_rescale_size(hw, seed, crop_size, scale: bool, tries: int = 10):
  """The size the authors' GT stream (VOCGTDataSet) rescales an image to.

  Their loop: up to ``tries`` times, optionally rescale by a factor from
  ``SCALES`` (the factors compound: each try rescales the previous result),
  and stop as soon as no padding to ``crop_size`` is needed; if every try
  needs padding, resize to ``crop_size`` instead. Without ``scale`` that is:
  keep the size if it fits, else resize to the crop. Returns int32 (h, w).
  """
  crop = tf.constant(crop_size, tf.int32)
  factors = tf.gather(tf.constant(SCALES, tf.float32),
                      tf.random.stateless_uniform([tries], seed, 0, len(SCALES),
                                                  dtype=tf.int32))
  cur = tf.cast(hw, tf.int32)
  final, found = crop, tf.constant(False)
  for i in range(tries):
    if scale:
      cur = tf.cast(tf.cast(cur, tf.float32) * factors[i] + 0.5, tf.int32)
    fits = tf.reduce_all(cur >= crop)
    final = tf.where(tf.logical_and(fits, tf.logical_not(found)), cur, final)
    found = tf.logical_or(found, fits)
  return final


def gt_augment(image, label, seed, crop_size, scale: bool, mirror: bool):
  """The authors' augmentation of the ground-truth stream for D.

  Rescale until no padding is needed (``gt_rescale_size``; one resize from
  the original to the final size rather than the authors' repeated resizes:
  the same geometry with one interpolation), normalise, random crop, optional
  mirror. Returns float32 image and int32 label like ``train_augment``.
  """
  seeds = split_seed(seed, 3)
  size = gt_rescale_size(tf.shape(image)[:2], seeds[0], crop_size, scale)
  image, label = resize(tf.cast(image, tf.float32), tf.cast(label, tf.int32), size)
  return _normalize_crop_mirror(image, label, seeds, crop_size, mirror)
