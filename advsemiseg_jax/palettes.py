"""Colour pictures: label maps in a dataset's palette, heat maps, overlays.

Everything here is host-side numpy on uint8 pictures, shared by the
TensorBoard images of evaluation and by ``mode=predict``.
"""
import numpy as np

from advsemiseg_jax.data import demo, ops, sources

IGNORE_COLOUR = (255, 255, 255)   # label 255 (ignore) in ground-truth pictures


def class_info(data_config):
  """(class names, (C, 3) uint8 palette) of the configured dataset, without
  reading it (``mode=predict`` runs without the dataset on disk).

  The tables are the ones ``data/sources.py`` gives its sources: the VOC
  colour map, the official Cityscapes colours, the demo's own; configured
  datasets (folder, tfds) use ``data.class_names`` and the VOC colour map.
  """
  n = data_config.num_classes
  known = {"demo": (demo.CLASS_NAMES, demo.PALETTE),
           "voc": (sources.VOC_CLASSES, sources.colormap(len(sources.VOC_CLASSES))),
           "cityscapes": (sources.CITYSCAPES_CLASSES, sources.CITYSCAPES_PALETTE)}
  names, palette = known.get(data_config.name, ((), None))
  if len(names) != n:
    names = tuple(data_config.class_names) or tuple(f"class_{i}" for i in range(n))
    palette = sources.colormap(n)
  return tuple(names), np.asarray(palette, np.uint8)


def colorize(labels, palette):
  """(..., H, W) class ids -> (..., H, W, 3) uint8; ids outside the palette
  (255 = ignore) are drawn white."""
  labels = np.asarray(labels)
  table = np.tile(np.asarray(IGNORE_COLOUR, np.uint8), (256, 1))
  table[:len(palette)] = palette
  return table[np.clip(labels, 0, 255).astype(np.int64)]


# A perceptual dark-blue -> yellow ramp (viridis control points), so heat maps
# need no matplotlib.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                  [253, 231, 37]], np.float64)


def heatmap(values):
  """(..., H, W) values in [0, 1] -> (..., H, W, 3) uint8 (0 dark blue, 1 yellow)."""
  v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)
  x = v * (len(_RAMP) - 1)
  lo = np.minimum(np.floor(x).astype(np.int64), len(_RAMP) - 2)
  t = (x - lo)[..., None]
  return np.round(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def overlay(image, colour, alpha: float = 0.5):
  """The colour label map blended over the RGB image (both uint8 HxWx3)."""
  out = (1 - alpha) * np.asarray(image, np.float64) + alpha * np.asarray(colour, np.float64)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def denormalize(images):
  """Network inputs (RGB minus the mean) -> uint8 RGB pictures."""
  return np.clip(np.round(np.asarray(images) + np.asarray(ops.RGB_MEAN)), 0,
                 255).astype(np.uint8)


def grid(rows, gap: int = 2):
  """A list of rows, each a list of equal-height HxWx3 uint8 panels, as one
  picture with ``gap`` white pixels between panels."""
  def hcat(panels):
    h = panels[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
      parts += ([sep] if i else []) + [p]
    return np.concatenate(parts, axis=1)

  lines = [hcat(r) for r in rows]
  width = max(l.shape[1] for l in lines)
  lines = [np.pad(l, ((0, 0), (0, width - l.shape[1]), (0, 0)), constant_values=255)
           for l in lines]
  sep = np.full((gap, width, 3), 255, np.uint8)
  parts = []
  for i, l in enumerate(lines):
    parts += ([sep] if i else []) + [l]
  return np.concatenate(parts, axis=0)
