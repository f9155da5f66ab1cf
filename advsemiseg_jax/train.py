"""``train_and_evaluate(config, workdir)``: the training loop, periodic
evaluation, checkpoints, metric writers and resume."""
import functools
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from advsemiseg_jax import (allocator, build, checkpoint, evaluate, faults, metrics,
                            parallel)
from advsemiseg_jax.build import build_training, init_variables  # noqa: F401 (API)
from advsemiseg_jax.data import sources, splits, streams
from advsemiseg_jax.step import uses_discriminator, uses_unlabeled
from advsemiseg_jax.validate import ConfigError, validate_config


class Trainer:
  """Everything built from a config: models, data, optimisers, compiled step."""

  def __init__(self, config, workdir: str):
    validate_config(config, workdir)
    self.config, self.workdir = config, workdir
    self.mesh = parallel.make_mesh()
    parallel.check_batch(config.data.batch_size, self.mesh)
    self.source = sources.get_source(config.data)
    if self.source.num_classes != config.data.num_classes:
      raise ConfigError(f"data.num_classes={config.data.num_classes} but dataset "
                        f"{self.source.name!r} has {self.source.num_classes} classes")
    self.labeled_ids, self.unlabeled_ids = splits.make_split(
        self.source.splits["train"], config.data, workdir, self.source.name)
    if uses_unlabeled(config.loss) and len(self.unlabeled_ids) == 0:
      raise ValueError("loss.lambda_semi or loss.lambda_semi_adv > 0 needs unlabeled "
                       "images, but data.labeled_fraction=1 labels all of them; "
                       "set both lambdas to 0 for a fully supervised run")
    self.generator, self.discriminator, abstract, step_fn = build.abstract_training(
        config, self.source.num_classes)
    repl = parallel.replicated(self.mesh)
    # The initial state's shapes, dtypes and shardings: enough to compile the
    # step and to restore a checkpoint; ``state`` is built when first read.
    self.abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)
    self.train_step = parallel.jit_train_step(step_fn, self.mesh)
    self.evaluator = evaluate.Evaluator(
        self.generator, self.source, config.data, self.mesh, tta_config=config.tta,
        discriminator=self.discriminator, num_pictures=config.eval_pictures)

  @functools.cached_property
  def state(self):
    """The initial TrainState (``build.initial_state``), on the mesh, with
    JAX's caches cleared of what built it (``parallel.replicate_state``)."""
    state = build.initial_state(self.config, self.generator, self.discriminator,
                                self.source.num_classes)
    return parallel.replicate_state(state, self.mesh)

  def compile_train_step(self):
    """The train step compiled for the state's and the batches' shapes,
    before the state or any batch exists: the compiler's transient memory
    (0.75 GiB for ResNet-101 on a CPU) does not add to the state's. What it
    freed is handed back to the system."""
    # The batch's sharding is the jitted step's own (``jit_train_step``).
    batch = streams.train_batch_spec(self.config.data,
                                     with_unlabeled=uses_unlabeled(self.config.loss),
                                     with_gt=uses_discriminator(self.config.loss))
    compiled = parallel.compile_train_step(self.train_step, self.abstract_state, batch)
    logging.info("step compiled, free memory released (%s)", allocator.release_free_memory())
    return compiled

  def batches(self, start_step: int):
    return streams.train_batches(
        self.source, self.config.data, self.labeled_ids, self.unlabeled_ids,
        self.config.seed, start_step,
        with_unlabeled=uses_unlabeled(self.config.loss),
        with_gt=uses_discriminator(self.config.loss))

  def eval_variables(self, state):
    return {"params": state.g_params, "batch_stats": state.g_batch_stats}

  def evaluate(self, state, writer=None, best=None, progress=False):
    """Evaluates on val, writes results.json (and, with ``writer``, scalars
    and pictures to TensorBoard); ``best``: the best-checkpoint manager."""
    step = int(jax.device_get(state.step))
    start = time.time()
    results = self.evaluator(self.eval_variables(state), progress=progress)
    results.update(step=step, dataset=self.source.name, split="val",
                   eval_seconds=round(time.time() - start, 2),
                   nonfinite_skips=int(jax.device_get(state.nonfinite_skips)))
    if jax.process_index() == 0:
      evaluate.write_results(self.workdir, results)
      logging.info("evaluation at step %d:\n%s", step,
                   metrics.format_table(results))
    if writer is not None:
      writer.write_scalars(step, {"val/miou": results["miou"],
                                  "val/pixel_accuracy": results["pixel_accuracy"]})
      writer.write_scalars(step, {f"val_iou/{k}": v for k, v in
                                  results["per_class_iou"].items() if v is not None})
      writer.write_scalars(step, {"val/miou_nonzero_diag": results["miou_nonzero_diag"],
                                  "val/mean_class_accuracy":
                                      results["mean_class_accuracy"]})
      if "tta" in results:
        writer.write_scalars(step, {"val/tta_miou": results["tta"]["miou"]})
      if self.evaluator.num_pictures:
        writer.write_images(step, {"val/pictures": self.evaluator.pictures(
            self.eval_variables(state), state.d_params)})
    if best is not None and checkpoint.save_if_best(best, state, results["miou"]):
      logging.info("new best val mIoU %.2f at step %d: %s", results["miou"], step,
                   best.directory)
    return results


def train_and_evaluate(config, workdir: str):
  """Trains (resuming from ``workdir``'s latest checkpoint) and evaluates.

  Returns the results of the last evaluation (also in ``workdir/results.json``).
  With ``config.mode == "evaluate"`` it only evaluates the latest checkpoint;
  with ``"predict"`` it runs ``predict.predict`` (returning its summary).
  SIGTERM during training saves a checkpoint of the current step and raises
  ``faults.Preempted`` (before training starts it exits at once with status 0).
  """
  with faults.Preemption() as preemption:
    return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config, workdir: str, preemption):
  if config.mode == "predict":  # a folder of images, no dataset needed
    from advsemiseg_jax import predict
    return predict.predict(config, workdir)
  trainer = Trainer(config, workdir)  # validate_config creates the workdir
  write_bytes = checkpoint.write_limit(trainer.abstract_state, config.checkpoint_write_mib)
  mngr = checkpoint.manager(workdir, config.max_to_keep, config.checkpoint_async,
                            write_bytes)
  # Compiled first, before the state exists; only training runs the step,
  # and a run whose last checkpoint is its last step runs none.
  latest = mngr.latest_step()
  train_step = None
  if config.mode == "train" and (latest is None or latest < config.num_steps):
    train_step = trainer.compile_train_step()
  restored = checkpoint.restore_latest(mngr, trainer.abstract_state)
  state = trainer.state if restored is None else restored
  start_step = int(jax.device_get(state.step))
  if restored is not None:
    logging.info("resumed from %s at step %d", mngr.directory, start_step)

  if config.mode == "evaluate":
    if restored is None and not config.init_from:
      raise FileNotFoundError(f"mode=evaluate but {mngr.directory} holds no checkpoint "
                              "and config.init_from is empty")
    results = trainer.evaluate(state, progress=True)
    if jax.process_index() == 0:
      print(metrics.format_table(results), flush=True)
    mngr.close()
    return results

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                          if not isinstance(v, dict)})
  report = periodic_actions.ReportProgress(num_train_steps=config.num_steps,
                                           writer=writer)
  best = checkpoint.best_manager(workdir, config.checkpoint_async, write_bytes)
  batches = trainer.batches(start_step)
  pending = []
  guard = faults.NonFiniteGuard(config.nonfinite_policy, mngr)
  results = None
  for step in range(start_step, config.num_steps):
    batch = parallel.to_global(next(batches), trainer.mesh)
    if train_step is None:  # The last step's checkpoint was unreadable.
      train_step = trainer.compile_train_step()
    state, step_metrics = train_step(state, batch)
    # From the first step on (compiled, dispatched), SIGTERM saves a checkpoint;
    # before it, there is nothing new to save and SIGTERM exits at once.
    preemption.armed = True
    pending.append(step_metrics)
    guard.add(step, step_metrics)
    done = step + 1
    report(done)
    if done % config.log_every == 0 or done == config.num_steps:
      guard.check()
      averaged = jax.tree.map(lambda *xs: float(np.mean(xs)), *[
          {k: v for k, v in m.items() if k != "nonfinite"}
          for m in jax.device_get(pending)])
      if config.nonfinite_policy == "skip":
        averaged["nonfinite_skips"] = int(jax.device_get(state.nonfinite_skips))
      writer.write_scalars(done, {f"train/{k}": v for k, v in averaged.items()})
      pending = []
    if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
      results = trainer.evaluate(state, writer, best)
    if done % config.checkpoint_every == 0 and done != config.num_steps:
      guard.check()
      checkpoint.save(mngr, state)
    if preemption.requested:
      guard.check()
      if mngr.latest_step() != done:
        checkpoint.save(mngr, state, force=True)
      mngr.wait_until_finished()
      mngr.close()
      best.wait_until_finished()
      best.close()
      writer.flush()
      raise faults.Preempted(f"preempted: checkpoint of step {done} saved in "
                             f"{mngr.directory}; run the same command again to resume")
  guard.check()
  if start_step < config.num_steps or mngr.latest_step() != config.num_steps:
    checkpoint.save(mngr, state, force=True)
  mngr.wait_until_finished()
  if preemption.requested:
    mngr.close()
    best.wait_until_finished()
    best.close()
    writer.flush()
    raise faults.Preempted(f"preempted: training finished and its checkpoint of step "
                           f"{config.num_steps} is saved in {mngr.directory}; run the "
                           "same command again to evaluate")
  results = trainer.evaluate(state, writer, best)
  mngr.wait_until_finished()
  mngr.close()
  best.wait_until_finished()
  best.close()
  writer.flush()
  return results
