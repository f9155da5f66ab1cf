"""Datasets: how each one lists and decodes its examples.

A ``Source`` is everything the streams need from a dataset: class names, a
palette, and per split a size and a tf-traceable ``load(index)`` returning
``{"image": uint8 HxWx3, "label": uint8 HxW}``. Datasets differ only here.
"""
import dataclasses
from typing import Callable, Dict, Sequence

import numpy as np
import tensorflow as tf

from advsemiseg_jax.data import demo


@dataclasses.dataclass(frozen=True)
class Split:
  size: int
  load: Callable[[tf.Tensor], Dict[str, tf.Tensor]]
  # Largest (height, width) of the split's images, if known without reading.
  max_shape: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  class_names: Sequence[str]
  palette: np.ndarray  # (num_classes, 3) uint8, for pictures
  splits: Dict[str, Split]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _in_memory_split(images: np.ndarray, labels: np.ndarray) -> Split:
  images_t, labels_t = tf.constant(images), tf.constant(labels)

  def load(index):
    return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index)}

  return Split(len(images), load, images.shape[1:3])


def demo_source(data_config) -> Source:
  cfg = data_config.demo
  # Fixed scene seeds: the demo dataset is the same for every run.
  train = demo.scenes(demo.TRAIN_SEED, 0, cfg.num_train, cfg.image_size)
  val = demo.scenes(demo.VAL_SEED, 0, cfg.num_val, cfg.image_size)
  return Source("demo", demo.CLASS_NAMES, demo.PALETTE,
                {"train": _in_memory_split(*train), "val": _in_memory_split(*val)})


SOURCES = {"demo": demo_source}


def get_source(data_config) -> Source:
  """The dataset named by ``config.data.name``."""
  if data_config.name not in SOURCES:
    raise ValueError(
        f"data.name={data_config.name!r} is not available in this version; "
        f"available datasets: {sorted(SOURCES)}")
  return SOURCES[data_config.name](data_config)
