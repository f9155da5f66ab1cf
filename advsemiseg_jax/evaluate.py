"""Evaluation: protocols, test-time augmentation, one confusion matrix, results.json.

Protocols (``data.eval_protocol``; every image of a split is placed at the
top-left of one fixed *canvas*, padded bottom/right with the mean colour and
with label 255, so the network compiles once per canvas and TTA scale, never
per image):

* ``pad``: the canvas is ``data.eval_size`` (VOC: 505x505, the authors'
  protocol; Cityscapes: 512x1024 on images resized to it on read). Logits are
  upsampled to the canvas (align_corners=True); padding is ignored.
* ``whole``: the generic protocol. The canvas is the split's largest image
  rounded up to the network's output stride (8), so every image is seen whole.
* ``sliding``: windows of ``data.eval_window`` every ``data.eval_stride``
  over the ``data.eval_size`` canvas (the last window of a row or column is
  aligned to the canvas edge); softmax probabilities of overlapping windows
  are averaged (Cityscapes at full resolution, 1024x2048).

Test-time augmentation (``tta.flip``, ``tta.scales``; off by default): the
probabilities of every (scale, flip) view, resized back to the canvas, are
averaged. It is computed in the same pass as the plain prediction and
reported separately (``results["tta"]``).

Everything accumulates into one (C, C) confusion matrix on device (summed
over batches; the jitted step sees global batches, so over hosts too), from
which ``metrics.summarize`` derives every number.
"""
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from advsemiseg_jax import metrics, palettes, parallel
from advsemiseg_jax.data import ops, streams
from advsemiseg_jax.models import OUTPUT_STRIDE, confidence_logits, upsample_logits
from advsemiseg_jax.models.layers import resize_bilinear

PROTOCOLS = ("pad", "whole", "sliding")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How images meet the network: the fixed canvas and, if sliding, windows."""
  name: str
  canvas: tuple
  window: tuple = ()
  stride: tuple = ()

  def describe(self) -> str:
    h, w = self.canvas
    if self.name == "sliding":
      return (f"sliding {self.window[0]}x{self.window[1]} windows, stride "
              f"{self.stride[0]}x{self.stride[1]}, over a {h}x{w} canvas")
    return f"{self.name}: padded to {h}x{w}"


def round_up(value: int, multiple: int = OUTPUT_STRIDE) -> int:
  return -(-int(value) // multiple) * multiple


def make_protocol(data_config, max_shape=()) -> Protocol:
  """The configured protocol; ``max_shape`` (largest (h, w) of the images,
  when known) sizes the ``whole`` canvas and is checked against the others."""
  name = data_config.eval_protocol
  if name not in PROTOCOLS:
    raise ValueError(f"data.eval_protocol must be one of {PROTOCOLS}, got {name!r}")
  max_shape = tuple(int(v) for v in (max_shape or ()))
  if name == "whole":
    if not max_shape:
      raise ValueError("data.eval_protocol=whole needs the images' sizes, which this "
                       "split does not report; use eval_protocol=pad with "
                       "data.eval_size >= the largest image")
    return Protocol(name, (round_up(max_shape[0]), round_up(max_shape[1])))
  canvas = tuple(int(v) for v in data_config.eval_size)
  if max_shape and (max_shape[0] > canvas[0] or max_shape[1] > canvas[1]):
    raise ValueError(f"images up to {max_shape[0]}x{max_shape[1]} do not fit "
                     f"data.eval_size={canvas}; raise data.eval_size or use "
                     "data.eval_protocol=whole")
  if name == "sliding":
    return Protocol(name, canvas, tuple(int(v) for v in data_config.eval_window),
                    tuple(int(v) for v in data_config.eval_stride))
  return Protocol(name, canvas)


def window_starts(size: int, window: int, stride: int):
  """Start offsets of windows covering ``size``; the last one ends at the edge."""
  if window >= size:
    return [0]
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def tta_views(tta_config):
  """The (scale, flip) views of TTA, or () when TTA is off."""
  scales = tuple(float(s) for s in tta_config.scales) or (1.0,)
  flips = (False, True) if tta_config.flip else (False,)
  views = tuple((s, f) for s in scales for f in flips)
  return () if views == ((1.0, False),) else views


def make_predict_fn(generator, protocol: Protocol, views=()):
  """``predict(variables, images) -> {"scores": ..., ["tta": ...]}``.

  ``scores``: the plain prediction at the canvas size, (B, H, W, C) logits
  (pad/whole) or window-averaged probabilities (sliding); its argmax is the
  prediction. ``tta`` (when ``views``): the probabilities averaged over the
  views. Not jitted.
  """

  def logits_at(variables, x):
    return upsample_logits(generator.apply(variables, x, train=False), x.shape[1:3])

  def probs(variables, x):
    if protocol.name != "sliding":
      return jax.nn.softmax(logits_at(variables, x), axis=-1)
    (wh, ww), (sh, sw) = protocol.window, protocol.stride
    b, h, w, _ = x.shape
    ph, pw = max(h, wh), max(w, ww)
    x = jnp.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    total, count = None, np.zeros((ph, pw), np.float32)
    for y0 in window_starts(ph, wh, sh):
      for x0 in window_starts(pw, ww, sw):
        p = jax.nn.softmax(logits_at(variables, x[:, y0:y0 + wh, x0:x0 + ww]), -1)
        p = jnp.pad(p, ((0, 0), (y0, ph - y0 - wh), (x0, pw - x0 - ww), (0, 0)))
        total = p if total is None else total + p
        count[y0:y0 + wh, x0:x0 + ww] += 1
    return (total / jnp.asarray(count)[None, :, :, None])[:, :h, :w]

  def view(variables, x, scale, flip):
    h, w = x.shape[1:3]
    if scale != 1.0:
      x = resize_bilinear(x, (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))))
    if flip:
      x = x[:, :, ::-1]
    p = probs(variables, x)
    if flip:
      p = p[:, :, ::-1]
    return resize_bilinear(p, (h, w))

  def predict(variables, images):
    if protocol.name == "sliding":
      plain = probs(variables, images)
    else:
      plain = logits_at(variables, images)
    out = {"scores": plain}
    if views:
      plain_probs = plain if protocol.name == "sliding" else jax.nn.softmax(plain, -1)
      ps = [plain_probs if (s, f) == (1.0, False) else view(variables, images, s, f)
            for s, f in views]
      out["tta"] = sum(ps) / len(ps)
    return out

  return predict


def make_eval_step(generator, num_classes: int, protocol: Protocol = None, views=()):
  """``eval_step(variables, images, labels) -> {"plain": (C, C)[, "tta": (C, C)]}``
  confusion matrices (not jitted). Without ``protocol``: ``pad`` at the
  images' own size."""
  if protocol is None:
    protocol = Protocol("pad", ())
  predict = make_predict_fn(generator, protocol, views)

  def eval_step(variables, images, labels):
    out = predict(variables, images)
    conf = {"plain": metrics.confusion_matrix(jnp.argmax(out["scores"], -1), labels,
                                              num_classes)}
    if "tta" in out:
      conf["tta"] = metrics.confusion_matrix(jnp.argmax(out["tta"], -1), labels,
                                             num_classes)
    return conf

  return eval_step


def make_picture_fn(generator, discriminator, protocol: Protocol):
  """``pictures(g_vars, d_params, images) -> (labels, softmax max, D confidence)``,
  each (B, H, W): the plain prediction, its softmax confidence and D's
  confidence map (sigmoid of D's upsampled output on the softmax). Not jitted."""
  predict = make_predict_fn(generator, protocol)

  def pictures(g_vars, d_params, images):
    scores = predict(g_vars, images)["scores"]
    probs = scores if protocol.name == "sliding" else jax.nn.softmax(scores, -1)
    d_out = discriminator.apply({"params": d_params}, probs)
    d_conf = jax.nn.sigmoid(confidence_logits(d_out, images.shape[1:3]))
    return jnp.argmax(probs, -1), jnp.max(probs, -1), d_conf

  return pictures


class Progress:
  """A text progress line on stderr: images done, images/s, ETA.

  Rewritten in place on a terminal; a new line every ``log_seconds`` in logs.
  """

  def __init__(self, total: int, what: str, stream=None, log_seconds: float = 10.0):
    self.total, self.what, self.done = total, what, 0
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = self.last = time.time()
    self.every = 0.5 if self.tty else log_seconds

  def line(self) -> str:
    elapsed = max(time.time() - self.start, 1e-9)
    rate = self.done / elapsed
    left = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta = "?" if math.isinf(left) else time.strftime("%H:%M:%S", time.gmtime(left))
    return (f"{self.what}: {self.done}/{self.total} images, {rate:.1f} images/s, "
            f"ETA {eta}")

  def update(self, n: int = 1):
    self.done = min(self.total, self.done + n)
    now = time.time()
    if now - self.last >= self.every or self.done == self.total:
      self.last = now
      end = "\n" if self.done == self.total or not self.tty else ""
      self.stream.write(("\r" if self.tty else "") + self.line() + end)
      self.stream.flush()


def _with_eval_size(data_config, size):
  cfg = ml_collections.ConfigDict(data_config.to_dict())
  cfg.eval_size = tuple(size)
  return cfg


class Evaluator:
  """Evaluates S on one split under the configured protocol and TTA.

  Compiles once (one canvas); ``__call__`` returns ``metrics.summarize``'s
  dict plus ``protocol`` and, with TTA, ``tta``.
  """

  def __init__(self, generator, source, data_config, mesh, split: str = "val",
               tta_config=None, discriminator=None, num_pictures: int = 0):
    self.source, self.mesh, self.split = source, mesh, split
    parallel.check_batch(data_config.eval_batch_size, mesh, "data.eval_batch_size")
    self.protocol = make_protocol(data_config, source.splits[split].max_shape)
    self.data_config = _with_eval_size(data_config, self.protocol.canvas)
    self.views = tta_views(tta_config) if tta_config is not None else ()
    self.tta_config = tta_config
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    self._step = jax.jit(
        make_eval_step(generator, source.num_classes, self.protocol, self.views),
        in_shardings=(repl, sharded, sharded), out_shardings=repl)
    self.num_pictures = num_pictures if discriminator is not None else 0
    if self.num_pictures:
      self._pictures = jax.jit(make_picture_fn(generator, discriminator, self.protocol),
                               in_shardings=(repl, repl, repl), out_shardings=repl)
      self._picture_batch = None

  def batches(self):
    return streams.eval_batches(self.source, self.data_config, self.split)

  def __call__(self, variables, progress: bool = False):
    size, gb = self.source.splits[self.split].size, self.data_config.eval_batch_size
    bar = Progress(size, f"evaluating {self.split}") if progress else None
    conf = None
    for batch in self.batches():
      batch = parallel.to_global({k: batch[k] for k in ("image", "label")}, self.mesh)
      c = self._step(variables, batch["image"], batch["label"])
      conf = c if conf is None else jax.tree.map(jnp.add, conf, c)
      if bar:
        bar.update(min(gb, size - bar.done))
    conf = jax.device_get(conf)
    names = list(self.source.class_names)
    results = metrics.summarize(np.asarray(conf["plain"]), names)
    results["protocol"] = self.protocol.describe()
    if "tta" in conf:
      tta = metrics.summarize(np.asarray(conf["tta"]), names)
      tta.update(flip=bool(self.tta_config.flip),
                 scales=[float(s) for s in (self.tta_config.scales or (1.0,))])
      results["tta"] = tta
    return results

  def picture_batch(self):
    """The first ``num_pictures`` images and labels of the split, read the
    same way on every host (they are fed replicated)."""
    if self._picture_batch is None:
      split = self.source.splits[self.split]
      images, labels = [], []
      for i in range(min(self.num_pictures, split.size)):
        example = split.load(tf.constant(i, tf.int64))
        image, label = ops.eval_preprocess(example["image"], example["label"],
                                           self.protocol.canvas)
        images.append(image.numpy())
        labels.append(label.numpy())
      self._picture_batch = (np.stack(images), np.stack(labels))
    return self._picture_batch

  def pictures(self, variables, d_params):
    """(N, H, 4W + gaps, 3) uint8 rows: input | ground truth | prediction |
    D's confidence map, for the fixed picture images."""
    images, labels = self.picture_batch()
    pred, _, d_conf = jax.device_get(self._pictures(variables, d_params, images))
    palette = self.source.palette
    rows = [palettes.grid([[palettes.denormalize(images[i]),
                            palettes.colorize(labels[i], palette),
                            palettes.colorize(pred[i], palette),
                            palettes.heatmap(d_conf[i])]])
            for i in range(len(images))]
    return np.stack(rows)


def write_results(workdir: str, results: dict, filename: str = "results.json"):
  """Writes ``results`` atomically (a reader never sees a half-written file)."""
  path = os.path.join(workdir, filename)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path
