"""Small fake dataset trees in the real layouts, for tests, smoke runs and the
input-pipeline benchmark. Images are real JPEG/PNG files with random
content; labels are real PNGs (single channel, or VOC-style palette).
"""
import os

import numpy as np
from PIL import Image

from advsemiseg_jax.data import sources


def _image(rng, h, w):
  """A smooth random image (compresses like a photo, unlike pure noise)."""
  base = rng.uniform(0, 255, size=(h // 8 + 2, w // 8 + 2, 3))
  img = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BILINEAR))
  return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _label(rng, h, w, values, ignore_border=True):
  """Random rectangles of class ``values`` on background ``values[0]``."""
  label = np.full((h, w), values[0], np.uint8)
  for _ in range(3):
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    y1, x1 = y0 + rng.integers(4, h // 2 + 5), x0 + rng.integers(4, w // 2 + 5)
    label[y0:y1, x0:x1] = rng.choice(values[1:])
  if ignore_border:
    label[0, :] = 255
  return label


def _save_palette_png(path, label):
  img = Image.fromarray(label, mode="P")
  img.putpalette(sources.colormap(256).reshape(-1).tolist())
  img.save(path)


def write_voc(root, num_train=8, num_val=3, size=(40, 60), palette_labels=0, seed=0):
  """A VOC2012 folder under ``root/VOCdevkit/VOC2012``; returns that folder.

  Train ids have SegmentationClassAug labels (single channel); val ids have
  both; the first ``palette_labels`` train ids also get a palette PNG in
  SegmentationClass (with the same indices).
  """
  rng = np.random.default_rng(seed)
  voc = os.path.join(root, "VOCdevkit", "VOC2012")
  for d in ("JPEGImages", "SegmentationClassAug", "SegmentationClass",
            "ImageSets/Segmentation"):
    os.makedirs(os.path.join(voc, d), exist_ok=True)
  names = [f"2007_{i:06d}" for i in range(num_train + num_val)]
  val = names[num_train:]
  for k, name in enumerate(names):
    h, w = size[0] + k % 3, size[1] - k % 2
    Image.fromarray(_image(rng, h, w)).save(
        os.path.join(voc, "JPEGImages", name + ".jpg"), quality=90)
    label = _label(rng, h, w, list(range(21)))
    Image.fromarray(label, mode="L").save(
        os.path.join(voc, "SegmentationClassAug", name + ".png"))
    if name in val or k < palette_labels:
      _save_palette_png(os.path.join(voc, "SegmentationClass", name + ".png"), label)
  with open(os.path.join(voc, "ImageSets/Segmentation/val.txt"), "w") as f:
    f.write("\n".join(val) + "\n")
  return voc


def write_cityscapes(root, num_train=6, num_val=2, size=(64, 128), seed=0):
  """A Cityscapes folder (two cities per split) at ``root``; returns ``root``."""
  rng = np.random.default_rng(seed)
  label_ids = list(range(34))
  for split, n in (("train", num_train), ("val", num_val)):
    for k in range(n):
      city = ("aachen", "bremen")[k % 2]
      name = f"{city}_{k:06d}_000019"
      for top in ("leftImg8bit", "gtFine"):
        os.makedirs(os.path.join(root, top, split, city), exist_ok=True)
      Image.fromarray(_image(rng, *size)).save(
          os.path.join(root, "leftImg8bit", split, city, name + "_leftImg8bit.png"))
      label = _label(rng, *size, values=[7] + label_ids, ignore_border=False)
      Image.fromarray(label, mode="L").save(
          os.path.join(root, "gtFine", split, city, name + "_gtFine_labelIds.png"))
  return root


def write_folder(root, num_train=6, num_val=2, size=(40, 60), num_classes=4,
                 void=None, seed=0):
  """A plain folder: images/, labels/, train.txt and val.txt of path pairs."""
  rng = np.random.default_rng(seed)
  for d in ("images", "labels"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  values = list(range(num_classes)) + ([void] if void is not None else [])
  for split, n in (("train", num_train), ("val", num_val)):
    lines = []
    for k in range(n):
      name = f"{split}_{k:03d}"
      Image.fromarray(_image(rng, *size)).save(os.path.join(root, "images", name + ".png"))
      label = _label(rng, *size, values=values, ignore_border=False)
      Image.fromarray(label, mode="L").save(os.path.join(root, "labels", name + ".png"))
      lines.append(f"images/{name}.png labels/{name}.png")
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return root
