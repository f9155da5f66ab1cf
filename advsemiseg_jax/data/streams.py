"""The tf.data streams the trainer and the evaluator consume.

Training draws three infinite streams per step: labeled (image, label),
unlabeled (image) and ground truth for D (label of a separately shuffled
labeled draw). Element ``e`` of a stream is a pure function of (seed, e): its
epoch's permutation comes from a stateless shuffle and its augmentation from a
stateless seed. So starting at step ``s`` yields exactly what an uninterrupted
run sees from step ``s`` on, and each host reads only its own slice of every
global batch.
"""
import jax
import numpy as np
import tensorflow as tf

from advsemiseg_jax.data import ops

STREAM_IDS = {"labeled": 1, "unlabeled": 2, "gt": 3}


def with_options(ds, data_config):
  """Sizes tf.data's own thread pool (``data.threads``, 0 = all cores) and
  keeps each op single-threaded, so input work does not fight XLA's threads."""
  opts = tf.data.Options()
  if data_config.threads:
    opts.threading.private_threadpool_size = data_config.threads
  opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts)


def _host_slice(global_batch: int):
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"batch {global_batch} is not divisible by {n} hosts")
  local = global_batch // n
  return jax.process_index() * local, local


def _element_indices(start_step: int, global_batch: int):
  """Global element indices of this host's slice, step after step."""
  offset, local = _host_slice(global_batch)
  steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
  return steps.flat_map(lambda s: tf.data.Dataset.range(
      s * global_batch + offset, s * global_batch + offset + local))


def _example_stream(split, ids, seed: int, stream: str, start_step: int,
                    global_batch: int, crop_size, scale: bool, mirror: bool,
                    gt_rescale: bool = False):
  """Augmented examples of ``ids``, reshuffled every epoch.

  The GT stream uses the authors' "rescale until no padding" rule when
  ``gt_rescale``; the others pad and crop (``ops.train_augment``).
  """
  augment = ops.gt_augment if stream == "gt" and gt_rescale else ops.train_augment
  ids_t = tf.constant(np.asarray(ids, np.int64))
  n = len(ids)
  base = tf.constant([seed, STREAM_IDS[stream]], tf.int64)

  def load(e):
    epoch_seed = tf.stack([base[0] * 1000 + base[1], e // n])
    perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                    epoch_seed)
    example = split.load(tf.gather(ids_t, perm[e % n]))
    aug_seed = tf.stack([base[0] * 1000 + base[1], e + (1 << 40)])
    return augment(example["image"], example["label"], aug_seed, crop_size, scale,
                   mirror)

  return _element_indices(start_step, global_batch).map(
      load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_batches(source, data_config, labeled_ids, unlabeled_ids, seed: int,
                  start_step: int = 0, with_unlabeled: bool = True,
                  with_gt: bool = True):
  """Iterator of host-local numpy batches for steps ``start_step, ...``.

  Keys: ``image`` (B,H,W,3 float32), ``label`` (B,H,W int32), and when asked
  ``unlabeled_image`` and ``gt_label``.
  """
  split = source.splits["train"]
  gb, crop = data_config.batch_size, tuple(data_config.crop_size)
  _, local = _host_slice(gb)
  kw = dict(start_step=start_step, global_batch=gb, crop_size=crop,
            scale=data_config.random_scale, mirror=data_config.random_mirror)
  parts = {"labeled": _example_stream(split, labeled_ids, seed, "labeled", **kw)}
  if with_unlabeled:
    parts["unlabeled"] = _example_stream(split, unlabeled_ids, seed, "unlabeled", **kw)
  if with_gt:
    parts["gt"] = _example_stream(split, labeled_ids, seed, "gt",
                                  gt_rescale=data_config.gt_rescale, **kw)

  def merge(d):
    out = {"image": d["labeled"][0], "label": d["labeled"][1]}
    if "unlabeled" in d:
      out["unlabeled_image"] = d["unlabeled"][0]
    if "gt" in d:
      out["gt_label"] = d["gt"][1]
    return out

  ds = tf.data.Dataset.zip(parts).batch(local, drop_remainder=True).map(merge)
  return with_options(ds, data_config).prefetch(data_config.prefetch).as_numpy_iterator()


def train_batch_spec(data_config, with_unlabeled: bool = True, with_gt: bool = True):
  """The global batch of ``train_batches`` (all processes' rows together) as
  ``jax.ShapeDtypeStruct``s, for compiling the step before any batch exists."""
  gb, (h, w) = data_config.batch_size, tuple(data_config.crop_size)
  image = jax.ShapeDtypeStruct((gb, h, w, 3), np.float32)
  label = jax.ShapeDtypeStruct((gb, h, w), np.int32)
  return {"image": image, "label": label,
          **({"unlabeled_image": image} if with_unlabeled else {}),
          **({"gt_label": label} if with_gt else {})}


def eval_batches(source, data_config, split_name: str = "val"):
  """Host-local numpy batches covering ``split_name`` once, in order.

  Images are padded bottom/right to ``data.eval_size``; the last global batch
  is completed with all-ignore examples. Keys: ``image``, ``label``, ``valid``
  (1 for real examples).
  """
  split = source.splits[split_name]
  gb, size = data_config.eval_batch_size, tuple(data_config.eval_size)
  offset, local = _host_slice(gb)
  num_batches = -(-split.size // gb)

  def load(e):
    real = e < split.size
    example = split.load(tf.minimum(e, split.size - 1))
    image, label = ops.eval_preprocess(example["image"], example["label"], size)
    label = tf.where(real, label, ops.IGNORE_LABEL)
    return {"image": image, "label": label, "valid": tf.cast(real, tf.int32)}

  idx = tf.data.Dataset.range(num_batches).flat_map(lambda b: tf.data.Dataset.range(
      b * gb + offset, b * gb + offset + local))
  ds = idx.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = with_options(ds.batch(local), data_config)
  return ds.prefetch(data_config.prefetch).as_numpy_iterator()
