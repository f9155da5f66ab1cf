"""Datasets: how each one lists and decodes its examples.

A ``Source`` is everything the streams need from a dataset: class names, a
palette, and per split a size and a tf-traceable ``load(index)`` returning
``{"image": uint8 HxWx3, "label": uint8 HxW}``. Datasets differ only here:
in how they list files and decode labels. Everything else (checks, the
optional fixed resize, the in-memory cache) is shared by ``examples_split``.

Available: ``demo`` (procedural scenes), ``voc`` (PASCAL VOC 2012 + SBD),
``cityscapes``, ``tfds`` (any tensorflow-datasets dataset with an image and a
mask feature) and ``folder`` (list files of image/label path pairs).
"""
import concurrent.futures
import dataclasses
import glob
import os
from typing import Callable, Dict, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from advsemiseg_jax.data import demo, files, ops
from advsemiseg_jax.data.files import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  size: int
  load: Callable[[tf.Tensor], Dict[str, tf.Tensor]]
  # Largest (height, width) of the split's images, if known without reading.
  max_shape: Sequence[int] = ()
  # Example names in index order (file stems, "city/name", relative paths).
  ids: Sequence[str] = ()
  # The names as listed, before bad files were skipped (default: ``ids``).
  # Index split files (the authors' train_id.pkl) index into this list.
  listed_ids: Sequence[str] = ()
  # Names of examples dropped by ``data.skip_bad_files``.
  skipped: Sequence[str] = ()

  @property
  def all_ids(self) -> Sequence[str]:
    return self.listed_ids or self.ids


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

  return Split(len(images), load, images.shape[1:3],
               tuple(str(i) for i in range(len(images))))


def demo_source(data_config) -> Source:
  cfg = data_config.demo
  # Fixed scene seeds: the demo dataset is the same for every run.
  train = demo.scenes(demo.TRAIN_SEED, 0, cfg.num_train, cfg.image_size)
  val = demo.scenes(demo.VAL_SEED, 0, cfg.num_val, cfg.image_size)
  return Source("demo", demo.CLASS_NAMES, demo.PALETTE,
                {"train": _in_memory_split(*train), "val": _in_memory_split(*val)})


# --------------------------------------------------------------------------
# Shared machinery: a list of examples -> a checked, optionally cached Split.


@dataclasses.dataclass(frozen=True)
class Examples:
  """A split as listed: names and a Python reader of one example.

  ``read(i)`` returns raw uint8 (image HxWx3, label HxW after the label map)
  and raises DataError naming the file on any problem. ``sizes(i)`` gives
  (h, w) from the header without decoding, or is None when unknown.
  """
  ids: Sequence[str]
  read: Callable[[int], tuple]
  sizes: Callable[[int], tuple] = None
  random_access: bool = True  # False: read in order once (TFDS), always cached


def file_examples(ids, image_paths, label_paths, lut) -> Examples:
  """Examples read from image and label files (any format PIL reads)."""
  ids, image_paths, label_paths = tuple(ids), tuple(image_paths), tuple(label_paths)

  def read(i):
    return files.read_pair(image_paths[i], label_paths[i], lut)

  return Examples(ids, read, lambda i: files.image_size(image_paths[i]))


def _num_threads(data_config) -> int:
  return data_config.threads or os.cpu_count() or 1


def _graph_read(read, resize):
  """index -> (image, label, error message) in-graph, via a Python reader."""

  def read_np(i):
    try:
      image, label = read(int(i))
      return image, label, b""
    except DataError as e:
      return (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8),
              str(e).encode())

  def fn(index):
    return _read_in_graph(read_np, [index], resize)

  return fn


def _read_in_graph(read_np, inputs, resize):
  """(image, label, error message) from the Python reader ``read_np(*inputs)``
  as graph tensors of known rank; with ``resize``, the pair resized to it,
  or zeros of that size where the reader reported an error."""
  image, label, err = tf.numpy_function(
      read_np, inputs, (tf.uint8, tf.uint8, tf.string), stateful=False)
  image.set_shape([None, None, 3])
  label.set_shape([None, None])
  err.set_shape([])
  if resize:
    image, label = tf.cond(
        tf.equal(err, b""), lambda: ops.resize_fixed(image, label, resize),
        lambda: (tf.zeros(tuple(resize) + (3,), tf.uint8),
                 tf.zeros(tuple(resize), tf.uint8)))
  return image, label, err


def _checked(image, label, err):
  """Fails the pipeline with ``err`` (which names the file) when it is set."""
  check = tf.debugging.Assert(tf.equal(err, b""), [err])
  with tf.control_dependencies([check]):
    return {"image": tf.identity(image), "label": tf.identity(label)}


def _read_all(examples: Examples, resize, data_config, keep: bool):
  """One parallel pass over every example, in order.

  Returns (kept indices, images, labels, {id: error}); images and labels are
  lists only when ``keep``. Raises the first error unless
  ``data.skip_bad_files``.
  """
  n = len(examples.ids)
  if examples.random_access:
    fn = _graph_read(examples.read, resize)
    ds = tf.data.Dataset.range(n).map(fn, num_parallel_calls=_num_threads(data_config),
                                      deterministic=True)
  else:
    ds = examples.read(resize)
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = _num_threads(data_config)
  ds = ds.with_options(opts).prefetch(4)
  kept, images, labels, errors = [], [], [], {}
  for i, (image, label, err) in enumerate(ds.as_numpy_iterator()):
    if err:
      if not data_config.skip_bad_files:
        raise DataError(err.decode())
      errors[examples.ids[i]] = err.decode()
      continue
    kept.append(i)
    if keep:
      images.append(image)
      labels.append(label)
  return kept, images, labels, errors


def _estimated_bytes(examples: Examples, resize, threads: int, skip: bool) -> tuple:
  """(decoded bytes of the split, max (h, w)) from file headers.

  An unreadable header raises DataError naming the file, unless ``skip``
  (then the checking pass reports it).
  """
  n = len(examples.ids)
  if resize:
    return n * resize[0] * resize[1] * 4, tuple(resize)

  def size(i):
    try:
      return examples.sizes(i)
    except DataError:
      if not skip:
        raise
      return None

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    sizes = [s for s in pool.map(size, range(n)) if s is not None]
  if not sizes:
    return 0, ()
  hw = np.array(sizes)
  return int((hw[:, 0] * hw[:, 1]).sum()) * 4, tuple(int(v) for v in hw.max(0))


def _use_cache(examples: Examples, data_config, resize):
  """(cache or not, max shape or ()) per ``data.cache``."""
  mode = data_config.cache
  if mode not in ("auto", "memory", "none"):
    raise DataError(f"data.cache must be auto, memory or none, got {mode!r}")
  if not examples.random_access:
    return True, tuple(resize)
  if mode == "memory":
    return True, tuple(resize)
  need, max_shape = _estimated_bytes(examples, resize, _num_threads(data_config),
                                     data_config.skip_bad_files)
  if mode == "none":
    return False, max_shape
  free = files.available_memory_bytes()
  fits = free == 0 or need < free // 2
  if not fits:
    logging.warning("data.cache=auto: %d examples need about %.1f GB decoded, more "
                    "than half of the %.1f GB available; reading from disk instead",
                    len(examples.ids), need / 1e9, free / 1e9)
  return fits, max_shape


def _cached_load(images, labels):
  """index -> example from lists of decoded arrays held in memory."""

  def get(i):
    i = int(i)
    return images[i], labels[i]

  def load(index):
    image, label = tf.numpy_function(get, [index], (tf.uint8, tf.uint8),
                                     stateful=False)
    image.set_shape([None, None, 3])
    label.set_shape([None, None])
    return {"image": image, "label": label}

  return load


def _report_skipped(what: str, errors: Dict[str, str]):
  if errors:
    shown = "\n  ".join(list(errors.values())[:10])
    logging.warning("data.skip_bad_files: skipped %d bad example(s) of %s:\n  %s",
                    len(errors), what, shown)


def examples_split(examples: Examples, data_config, resize=(), what: str = "") -> Split:
  """A Split of ``examples``: checked, resized to ``resize``, maybe cached.

  Cached (``data.cache``), every example is decoded and checked once here, in
  parallel, so a bad file stops the run before training. Otherwise examples
  are read at each use and a bad file fails the stream with its name; with
  ``data.skip_bad_files`` a checking pass still runs here, so that skipping
  never changes which examples a step sees.
  """
  resize = tuple(resize or ())
  if not examples.ids:
    raise DataError(f"{what}: no examples found")
  cache, max_shape = _use_cache(examples, data_config, resize)
  listed = tuple(examples.ids)
  if cache or data_config.skip_bad_files:
    kept, images, labels, errors = _read_all(examples, resize, data_config, cache)
    _report_skipped(what, errors)
    if not kept:
      raise DataError(f"{what}: every example was skipped as bad")
  else:
    kept, errors = list(range(len(listed))), {}
  ids = tuple(listed[i] for i in kept)
  if cache:
    shapes = np.array([im.shape[:2] for im in images])
    max_shape = tuple(int(v) for v in shapes.max(0))
    load = _cached_load(images, labels)
    logging.info("%s: %d examples cached in memory (%.2f GB)", what, len(ids),
                 sum(im.nbytes + lb.nbytes for im, lb in zip(images, labels)) / 1e9)
  else:
    read = _graph_read(examples.read, resize)
    kept_t = tf.constant(np.asarray(kept, np.int64))

    def load(index):
      return _checked(*read(tf.gather(kept_t, index)))

  return Split(len(ids), load, max_shape, ids,
               listed if errors else (), tuple(errors))


def limit(examples: Examples, count: int) -> Examples:
  """The first ``count`` examples (all when ``count`` is 0)."""
  if not count or count >= len(examples.ids):
    return examples
  return dataclasses.replace(examples, ids=tuple(examples.ids)[:count])


def colormap(n: int) -> np.ndarray:
  """The standard VOC colour map (bit-interleaved), ``n`` rows of RGB uint8."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def _path(root: str, path: str) -> str:
  return path if os.path.isabs(path) else os.path.join(root, path)


def _stem(token: str) -> str:
  return os.path.splitext(os.path.basename(token))[0]


# --------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD.

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
               "car", "cat", "chair", "cow", "diningtable", "dog", "horse",
               "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_LAYOUT = """  ROOT/JPEGImages/NAME.jpg
  ROOT/SegmentationClassAug/NAME.png   (SBD aug labels: single channel 0..20, 255 ignore)
  and/or ROOT/SegmentationClass/NAME.png (VOC's palette PNGs)
  ROOT/ImageSets/Segmentation/val.txt  (val ids, one per line)
ROOT is the VOC2012 folder or a VOCdevkit folder that contains VOC2012."""


def _require_root(root: str, folder: str, what: str, layout: str):
  """DataError unless ``root`` is set and is a folder; names the layout."""
  if not root:
    raise DataError(f"data.root is empty; set --config.data.root to the {folder} "
                    f"folder.\nExpected layout:\n{layout}")
  files.require_dir(root, what, layout)


def _require_labels(images, labels, context: str):
  """DataError naming the first image whose label file is missing."""
  for image, label in zip(images, labels):
    if not os.path.isfile(label):
      raise DataError(f"image {image} has no label: {label} is missing{context}")


def voc_dir(root: str) -> str:
  """The VOC2012 folder: ``root`` itself or ``root/VOC2012``."""
  _require_root(root, "VOC2012 (or VOCdevkit)", "VOC root (data.root)", VOC_LAYOUT)
  for d in (root, os.path.join(root, "VOC2012")):
    if os.path.isdir(os.path.join(d, "JPEGImages")):
      return d
  raise DataError(f"no JPEGImages folder in {root!r} nor in "
                  f"{os.path.join(root, 'VOC2012')!r}.\nExpected layout:\n{VOC_LAYOUT}")


def _voc_label_dirs(voc: str):
  """Label folders in order of preference: SBD aug first, then VOC's own."""
  dirs = [os.path.join(voc, "SegmentationClassAug"),
          os.path.join(os.path.dirname(voc.rstrip("/")), "SegmentationClassAug"),
          os.path.join(voc, "SegmentationClass")]
  return [d for d in dirs if os.path.isdir(d)]


def _voc_label_path(label_dirs, name: str, image: str) -> str:
  for d in label_dirs:
    p = os.path.join(d, name + ".png")
    if os.path.isfile(p):
      return p
  raise DataError(f"image {image} has no label: {name}.png is in none of "
                  f"{label_dirs}.\nExpected layout:\n{VOC_LAYOUT}")


def _voc_ids_from_list(path: str) -> list:
  """Ids from a list file: the stem of each line's first token.

  Accepts plain ids (``2007_000032``) and DeepLab-style lines
  (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).
  """
  return [_stem(row[0]) for row in files.read_list_file(path)]


def voc_train_ids(voc: str, label_dirs, val_ids, data_config) -> list:
  """The explicit list, or sorted ids with an aug (else any) label minus val."""
  if data_config.train_list:
    return _voc_ids_from_list(_path(voc, data_config.train_list))
  aug = [d for d in label_dirs if d.endswith("SegmentationClassAug")]
  pool = aug[:1] or label_dirs
  if not pool:
    raise DataError(f"no label folder in {voc!r}.\nExpected layout:\n{VOC_LAYOUT}")
  names = {_stem(p) for p in glob.glob(os.path.join(pool[0], "*.png"))}
  return sorted(names - set(val_ids))


def _voc_examples(voc, label_dirs, ids, lut, what) -> Examples:
  images = [os.path.join(voc, "JPEGImages", i + ".jpg") for i in ids]
  files.require_all(images, f"{what} image(s)", VOC_LAYOUT)
  labels = [_voc_label_path(label_dirs, i, im) for i, im in zip(ids, images)]
  return file_examples(ids, images, labels, lut)


def voc_source(data_config) -> Source:
  voc = voc_dir(data_config.root)
  label_dirs = _voc_label_dirs(voc)
  if not label_dirs:
    raise DataError(f"no SegmentationClassAug or SegmentationClass folder in "
                    f"{voc!r}.\nExpected layout:\n{VOC_LAYOUT}")
  val_list = _path(voc, data_config.val_list or "ImageSets/Segmentation/val.txt")
  files.require_file(val_list, "VOC val list", VOC_LAYOUT)
  val_ids = _voc_ids_from_list(val_list)
  train_ids = voc_train_ids(voc, label_dirs, val_ids, data_config)
  lut = files.label_lut(len(VOC_CLASSES), files.parse_label_map(data_config.label_map))
  train = _voc_examples(voc, label_dirs, train_ids, lut, "VOC train")
  val = limit(_voc_examples(voc, label_dirs, val_ids, lut, "VOC val"),
              data_config.val_limit)
  return Source("voc", VOC_CLASSES, colormap(len(VOC_CLASSES)), {
      "train": examples_split(train, data_config, data_config.resize, "VOC train"),
      "val": examples_split(val, data_config, data_config.eval_resize, "VOC val")})


# --------------------------------------------------------------------------
# Cityscapes.

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole",
                      "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                      "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
# The official labelId -> trainId table (cityscapesScripts labels.py); ids
# without a trainId map to 255. 255 (also how -1, license plate, is stored)
# stays 255; 34..254 are not labelIds and are reported.
CITYSCAPES_TRAIN_IDS = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255,
    10: 255, 11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6,
    20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255,
    30: 255, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LAYOUT = """  ROOT/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png
  ROOT/gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png"""
NAMED_LABEL_MAPS = {"cityscapes": CITYSCAPES_TRAIN_IDS}


def cityscapes_lut() -> np.ndarray:
  """256-entry labelId -> trainId table; values 34..254 are INVALID."""
  lut = np.full(256, files.INVALID, np.int32)
  lut[files.IGNORE_LABEL] = files.IGNORE_LABEL
  lut[:34] = [CITYSCAPES_TRAIN_IDS[i] for i in range(34)]
  return lut


def _label_lut(data_config, num_classes: int) -> np.ndarray:
  """``data.label_map``: a named table or SRC:DST pairs over the identity."""
  spec = data_config.label_map
  if spec in NAMED_LABEL_MAPS:
    if spec == "cityscapes" and num_classes != len(CITYSCAPES_CLASSES):
      raise DataError("data.label_map=cityscapes gives 19 classes; "
                      f"data.num_classes is {num_classes}")
    return cityscapes_lut()
  return files.label_lut(num_classes, files.parse_label_map(spec))


def cityscapes_examples(root: str, split: str, lut) -> Examples:
  """Sorted ``CITY/NAME`` ids of one split, so split indices are portable."""
  image_dir = os.path.join(root, "leftImg8bit", split)
  label_dir = os.path.join(root, "gtFine", split)
  files.require_dir(image_dir, f"Cityscapes {split} images", CITYSCAPES_LAYOUT)
  files.require_dir(label_dir, f"Cityscapes {split} labels", CITYSCAPES_LAYOUT)
  suffix = "_leftImg8bit.png"
  images = sorted(glob.glob(os.path.join(image_dir, "*", "*" + suffix)))
  if not images:
    raise DataError(f"no *{suffix} files under {image_dir!r}.\n"
                    f"Expected layout:\n{CITYSCAPES_LAYOUT}")
  ids = [os.path.relpath(p, image_dir)[:-len(suffix)] for p in images]
  labels = [os.path.join(label_dir, i + "_gtFine_labelIds.png") for i in ids]
  _require_labels(images, labels, f".\nExpected layout:\n{CITYSCAPES_LAYOUT}")
  return file_examples(ids, images, labels, lut)


def cityscapes_source(data_config) -> Source:
  root = data_config.root
  _require_root(root, "Cityscapes", "Cityscapes root (data.root)", CITYSCAPES_LAYOUT)
  lut = cityscapes_lut()
  train = cityscapes_examples(root, "train", lut)
  val = limit(cityscapes_examples(root, "val", lut), data_config.val_limit)
  return Source("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, {
      "train": examples_split(train, data_config, data_config.resize,
                              "Cityscapes train"),
      "val": examples_split(val, data_config, data_config.eval_resize,
                            "Cityscapes val")})


# --------------------------------------------------------------------------
# Configured datasets: class names, palette and label map come from config.


def _class_names(data_config) -> tuple:
  names = tuple(data_config.class_names)
  if names and len(names) != data_config.num_classes:
    raise DataError(f"data.class_names has {len(names)} names but data.num_classes "
                    f"is {data_config.num_classes}")
  return names or tuple(f"class_{i}" for i in range(data_config.num_classes))


def tfds_examples(data_config, split: str) -> Examples:
  """Examples of a tensorflow-datasets split, read once in order (cached).

  Nothing is downloaded: the dataset must already be prepared in
  ``data.root`` (or TFDS's default data_dir when empty).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = data_config.tfds
  lut = _label_lut(data_config, data_config.num_classes)
  try:
    ds = tfds.load(cfg.name, split=split, data_dir=data_config.root or None,
                   download=False, shuffle_files=False)
  except Exception as e:  # TFDS raises assorted types for "not prepared".
    raise DataError(
        f"cannot open TFDS dataset {cfg.name!r} split {split!r} in data_dir "
        f"{data_config.root or '(TFDS default)'!r}: {e}\nPrepare it first, e.g. "
        f"`tfds build {cfg.name} --data_dir=DIR`, then set --config.data.root=DIR "
        "(this program never downloads).") from None
  spec = ds.element_spec
  for key in (cfg.image_key, cfg.label_key):
    if key not in spec:
      raise DataError(f"TFDS dataset {cfg.name!r} has no feature {key!r}; its "
                      f"features are {sorted(spec)} (set data.tfds.image_key / "
                      "data.tfds.label_key)")
  n = int(ds.cardinality())
  if n < 0:
    n = sum(1 for _ in ds)
  count = data_config.val_limit if split == cfg.val_split and data_config.val_limit else n
  count = min(count, n)
  ids = tuple(f"{cfg.name}/{split}/{i}" for i in range(count))

  def check_np(image, label, i):
    where = f"TFDS {cfg.name} {split} example {int(i)}"
    try:
      if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"{where}: image has shape {image.shape}, expected HxWx3")
      mapped = files.map_label(label.reshape(label.shape[:2]), lut, where)
      files.check_sizes(image, mapped, where, where)
      return image, mapped, b""
    except DataError as e:
      return (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8),
              str(e).encode())

  def read(resize):
    def fn(i, ex):
      return _read_in_graph(check_np, [ex[cfg.image_key], ex[cfg.label_key], i], resize)
    return ds.take(count).enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE,
                                          deterministic=True)

  return Examples(ids, read, random_access=False)


def tfds_source(data_config) -> Source:
  cfg = data_config.tfds
  if not cfg.name:
    raise DataError("data.name=tfds needs data.tfds.name (e.g. oxford_iiit_pet)")
  names = _class_names(data_config)
  return Source(f"tfds:{cfg.name}", names, colormap(len(names)), {
      "train": examples_split(tfds_examples(data_config, cfg.train_split), data_config,
                              data_config.resize, f"TFDS {cfg.name} {cfg.train_split}"),
      "val": examples_split(tfds_examples(data_config, cfg.val_split), data_config,
                            data_config.eval_resize, f"TFDS {cfg.name} {cfg.val_split}")})


FOLDER_LAYOUT = """  ROOT/LIST.txt: one example per line, either
    IMAGE LABEL   (two paths relative to ROOT, e.g. train/a.png trainannot/a.png)
    NAME          (then ROOT/IMAGE_DIR/NAME.{jpg,png} and ROOT/LABEL_DIR/NAME.png)
  labels: single-channel PNGs of class ids (palette PNGs are read by index)"""


def _folder_pair(root, data_config, row):
  if len(row) >= 2:
    return row[0], _path(root, row[0]), _path(root, row[1])
  name = row[0]
  for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
    image = os.path.join(root, data_config.image_dir, name + ext)
    if os.path.isfile(image):
      break
  else:
    image = os.path.join(root, data_config.image_dir, name + ".jpg")
  return name, image, os.path.join(root, data_config.label_dir, name + ".png")


def folder_examples(data_config, list_file: str, lut) -> Examples:
  root = data_config.root
  list_path = _path(root, list_file)
  files.require_file(list_path, "list file", FOLDER_LAYOUT)
  rows = [_folder_pair(root, data_config, r)
          for r in files.read_list_file(list_path)]
  if not rows:
    raise DataError(f"list file {list_path} lists no examples")
  ids, images, labels = zip(*rows)
  files.require_all(images, f"image(s) listed in {list_path}", FOLDER_LAYOUT)
  _require_labels(images, labels, f" (listed in {list_path})")
  return file_examples(ids, images, labels, lut)


def folder_source(data_config) -> Source:
  root = data_config.root
  _require_root(root, "dataset", "dataset root (data.root)", FOLDER_LAYOUT)
  names = _class_names(data_config)
  lut = _label_lut(data_config, len(names))
  train = folder_examples(data_config, data_config.train_list or "train.txt", lut)
  val = limit(folder_examples(data_config, data_config.val_list or "val.txt", lut),
              data_config.val_limit)
  return Source(f"folder:{os.path.basename(os.path.normpath(root))}", names,
                colormap(len(names)), {
                    "train": examples_split(train, data_config, data_config.resize,
                                            f"{root} train"),
                    "val": examples_split(val, data_config, data_config.eval_resize,
                                          f"{root} val")})


SOURCES = {"demo": demo_source, "voc": voc_source, "cityscapes": cityscapes_source,
           "tfds": tfds_source, "folder": folder_source}


def get_source(data_config) -> Source:
  """The dataset named by ``config.data.name``."""
  if data_config.name not in SOURCES:
    raise ValueError(
        f"data.name={data_config.name!r} is not available in this version; "
        f"available datasets: {sorted(SOURCES)}")
  return SOURCES[data_config.name](data_config)
