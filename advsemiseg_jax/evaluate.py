"""Evaluation: confusion matrix over a split, metrics, results.json."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from advsemiseg_jax import metrics, parallel
from advsemiseg_jax.data import streams
from advsemiseg_jax.models import upsample_logits


def make_eval_step(generator, num_classes: int):
  """``eval_step(variables, images, labels) -> (C, C) confusion`` (not jitted)."""

  def eval_step(variables, images, labels):
    logits = generator.apply(variables, images, train=False)
    pred = jnp.argmax(upsample_logits(logits, images.shape[1:3]), axis=-1)
    return metrics.confusion_matrix(pred, labels, num_classes)

  return eval_step


class Evaluator:
  """Evaluates S on one split; compiles once per evaluation shape."""

  def __init__(self, generator, source, data_config, mesh, split: str = "val"):
    self.source, self.data_config, self.mesh, self.split = source, data_config, mesh, split
    parallel.check_batch(data_config.eval_batch_size, mesh, "data.eval_batch_size")
    self._step = jax.jit(make_eval_step(generator, source.num_classes),
                         in_shardings=(parallel.replicated(mesh),
                                       parallel.batch_sharded(mesh),
                                       parallel.batch_sharded(mesh)),
                         out_shardings=parallel.replicated(mesh))

  def __call__(self, variables):
    conf = None
    for batch in streams.eval_batches(self.source, self.data_config, self.split):
      batch = parallel.to_global({k: batch[k] for k in ("image", "label")}, self.mesh)
      c = self._step(variables, batch["image"], batch["label"])
      conf = c if conf is None else conf + c
    return metrics.summarize(np.asarray(jax.device_get(conf)),
                             list(self.source.class_names))


def write_results(workdir: str, results: dict, filename: str = "results.json"):
  """Writes ``results`` atomically (a reader never sees a half-written file)."""
  path = os.path.join(workdir, filename)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
  return path
