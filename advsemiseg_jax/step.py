"""The one training step: S's and D's gradients at the same parameters, both
optimisers applied, measurements returned. A pure function of (state, batch).
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from advsemiseg_jax import losses, ordering
from advsemiseg_jax.faults import (NONFINITE_D_GRAD, NONFINITE_G_GRAD, NONFINITE_LOSS,
                                   NONFINITE_POLICIES)
from advsemiseg_jax.models import confidence_logits, upsample_logits


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  g_params: Any
  g_batch_stats: Any
  d_params: Any
  g_opt_state: Any
  d_opt_state: Any
  rng: jnp.ndarray
  # Updates skipped by ``nonfinite_policy="skip"`` (int32 scalar in training).
  nonfinite_skips: Any = 0


def all_finite(tree) -> jnp.ndarray:
  """Whether no float leaf of ``tree`` holds a NaN or an infinity: one float32
  sum per leaf, which is NaN or infinite as soon as one element is. A leaf
  whose finite elements sum beyond float32's range (|sum| > 3.4e38, that is
  elements of 1e32 in a million-element kernel) counts as not finite too:
  such a gradient would blow the parameters up all the same.

  ``all(isfinite(x))`` wrote a full-size boolean array per leaf and reduced
  it in two more passes on XLA:CPU, and ``sum(x * 0)`` (exact) wrote ``x *
  0`` out: 35 MiB more planned for the ResNet-101 step (docs/performance.md).
  """
  sums = [jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.isfinite(jnp.stack(sums))) if sums else jnp.bool_(True)


def guard_nonfinite(state, new_state, metrics, g_grads, d_grads, policy: str):
  """Adds ``metrics["nonfinite"]`` (0, or an OR of the NONFINITE_* bits) and,
  with ``policy="skip"``, keeps ``state`` (step advanced, skip counted) when
  any loss or gradient is not finite. No host sync: the trainer reads the
  flag when it fetches the measurements."""
  losses_ok = all_finite({k: v for k, v in metrics.items() if k.startswith("loss")})
  g_ok = all_finite(g_grads)
  d_ok = all_finite(d_grads) if d_grads is not None else jnp.bool_(True)
  flag = (jnp.where(losses_ok, 0, NONFINITE_LOSS) + jnp.where(g_ok, 0, NONFINITE_G_GRAD)
          + jnp.where(d_ok, 0, NONFINITE_D_GRAD)).astype(jnp.int32)
  metrics = dict(metrics, nonfinite=flag)
  if policy == "skip":
    ok = flag == 0
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    new_state = kept.replace(
        step=new_state.step,
        nonfinite_skips=state.nonfinite_skips + jnp.where(ok, 0, 1).astype(jnp.int32))
  elif policy != "stop":
    raise ValueError(f"nonfinite_policy must be one of {NONFINITE_POLICIES}, got {policy!r}")
  return new_state, metrics


def trainable_leaves(tree, frozen) -> list:
  """The leaves of ``tree`` that ``frozen`` (a tree of bools of the same
  structure, or None for none frozen) does not mark, in order."""
  leaves = jax.tree.leaves(tree)
  if frozen is None:
    return leaves
  return [x for x, f in zip(leaves, jax.tree.leaves(frozen)) if not f]


def with_trainable(tree, frozen, trainable, fill=None):
  """``tree`` with its unfrozen leaves replaced, in order, by ``trainable``
  (``trainable_leaves``' counterpart), and its frozen ones by
  ``fill(leaf)`` when ``fill`` is given."""
  leaves, treedef = jax.tree.flatten(tree)
  flags = [False] * len(leaves) if frozen is None else jax.tree.leaves(frozen)
  if len(flags) != len(leaves):
    raise ValueError(f"frozen has {len(flags)} leaves, the parameters {len(leaves)}")
  rest = iter(trainable)
  return treedef.unflatten([(fill(x) if fill else x) if f else next(rest)
                            for x, f in zip(leaves, flags)])


def _static_zero(weight) -> bool:
  """Whether a loss weight is the Python number 0 (its term is left out)."""
  return isinstance(weight, (int, float)) and weight == 0


def uses_unlabeled(loss_config) -> bool:
  """Whether the unlabeled branch exists at all (decided at trace time)."""
  return loss_config.lambda_semi > 0 or loss_config.lambda_semi_adv > 0


def uses_discriminator(loss_config) -> bool:
  return loss_config.lambda_adv > 0 or uses_unlabeled(loss_config)


def make_train_step(loss_config, generator, discriminator, g_tx, d_tx,
                    g_schedule, d_schedule, nonfinite_policy: str = "stop",
                    iter_size: int = 1, sequential_passes: bool = False,
                    unroll_loops: bool = False, frozen=None):
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  ``batch`` holds ``image`` (B,H,W,3), ``label`` (B,H,W) and, when the method
  needs them, ``unlabeled_image`` and ``gt_label`` (D's real examples).
  Which terms exist is fixed by the config; when they switch on
  (``semi_start``, ``semi_start_adv``) is decided inside the compiled step.
  ``nonfinite_policy`` (see ``guard_nonfinite``): "stop" only flags a
  non-finite loss or gradient in ``metrics["nonfinite"]``; "skip" also keeps
  the previous state for that step.
  ``iter_size`` > 1 accumulates gradients as the authors' ``--iter-size``:
  the batch is split into ``iter_size`` microbatches (row ``r`` goes to
  microbatch ``r % iter_size``, so every device's rows split evenly), each
  normalised with its own BN statistics (running averages updated in turn),
  and both optimisers apply the mean of the microbatch gradients once.
  ``sequential_passes`` computes S's unlabeled gradient before the labeled
  forward pass starts, as one loop over the two batches (less memory, less
  overlap, a program about a third smaller; same result up to rounding).
  The batches must then have the same shape (the trainer's always do);
  otherwise both passes are fused.
  ``unroll_loops`` traces those loops (and ``iter_size``'s) as straight-line
  code: the same computation, for tools that count its work (XLA's cost
  analysis counts a loop body once); a larger program to compile.
  ``frozen`` (a tree of bools shaped as S's parameters, default none) marks
  parameters that S's optimiser never changes (``optim.frozen_mask``): S is
  differentiated with respect to the others only, as torch skips tensors
  with ``requires_grad=False``, and the frozen ones get a zero gradient
  (the optimiser ignores it) that no check or sum reads.
  """
  scan = functools.partial(jax.lax.scan, unroll=True if unroll_loops else 1)
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  lc = loss_config
  with_unlabeled, with_d = uses_unlabeled(lc), uses_discriminator(lc)
  ignore = losses.IGNORE_LABEL

  def segment(g_params, batch_stats, images):
    """S's upsampled logits; BN statistics of this batch alone."""
    logits, updates = generator.apply(
        {"params": g_params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    return upsample_logits(logits, images.shape[1:3]), updates["batch_stats"]

  def d_map(d_params, probs):
    return confidence_logits(discriminator.apply({"params": d_params}, probs),
                             probs.shape[1:3])

  def gradients(state, batch, batch_stats):
    """S's and D's gradients on one (micro)batch at ``state``'s parameters:
    (g_grads, d_grads or None, S's new BN statistics, measurements);
    ``g_grads`` is a list, the gradients of S's ``trainable_leaves``."""
    step = state.step
    labels = batch["label"]
    semi_on = step >= lc.semi_start
    semi_adv_on = step >= lc.semi_start_adv

    def pass_loss(trainable, stats, images, w, adv_mask):
      """S on one batch and its weighted loss terms: (total, (new BN
      statistics, {term: value})), a function of S's ``trainable_leaves``.
      ``w`` holds the weights of "ce", "adv" and "semi", and "skip_empty" (a
      zero total when no pixel passes T_semi); a weight that is a Python 0
      leaves its term out."""
      g_params = with_trainable(state.g_params, frozen, trainable)
      logits, stats = segment(g_params, stats, images)
      out, total = {"logits": logits}, 0.0
      if not _static_zero(w["ce"]):
        out["ce"] = losses.cross_entropy(logits, labels)
        total = total + w["ce"] * out["ce"]
      if not (_static_zero(w["adv"]) and _static_zero(w["semi"])):
        d = d_map(state.d_params, jax.nn.softmax(logits))
        out["adv"] = losses.adversarial_loss(d, adv_mask)
        total = total + w["adv"] * out["adv"]
      if not _static_zero(w["semi"]):
        out["semi"], out["semi_ratio"] = losses.semi_loss(logits, d, lc.t_semi)
        total = total + w["semi"] * out["semi"]
        total = jnp.where(w["skip_empty"] & (out["semi_ratio"] == 0), 0.0, total)
      return total, (stats, out)

    # The unlabeled pass first, then the labeled one, as the authors' code.
    unlabeled_w = {"ce": 0, "adv": jnp.where(semi_adv_on, lc.lambda_semi_adv, 0.0),
                   "semi": jnp.where(semi_on, lc.lambda_semi, 0.0),
                   "skip_empty": semi_on & lc.skip_unlabeled_when_mask_empty}
    labeled_w = {"ce": 1.0, "adv": lc.lambda_adv, "semi": 0, "skip_empty": False}
    unlabeled_names = {"adv": "loss_semi_adv", "semi": "loss_semi",
                       "semi_ratio": "semi_ratio", "logits": "unlabeled_logits"}
    labeled_names = {"ce": "loss_ce", "logits": "logits",
                     **({"adv": "loss_adv"} if lc.lambda_adv > 0 else {})}
    rename = lambda out, names: {names[k]: v for k, v in out.items() if k in names}
    unlabeled_mask, labeled_mask = jnp.ones_like(labels, bool), labels != ignore
    trainable = trainable_leaves(state.g_params, frozen)
    if (with_unlabeled and sequential_passes
        and batch["unlabeled_image"].shape == batch["image"].shape):
      # S's two passes as one loop body over the two batches: each pass's
      # gradient is done before the next pass starts (their activations are
      # never alive together, as with the authors' two backward() calls),
      # and the compiled program holds S's forward and backward once.
      # In the loop both passes compute every term (a stacked weight, 0 where
      # a term does not belong: same total and gradient, a little more work).
      both = lambda u, l: jnp.stack([jnp.asarray(u), jnp.asarray(l)])
      xs = (both(batch["unlabeled_image"], batch["image"]),
            jax.tree.map(both, {**unlabeled_w, "ce": 0.0}, {**labeled_w, "semi": 0.0}),
            both(unlabeled_mask, labeled_mask))

      def one_pass(carry, x):
        stats, g_sum = carry
        (total, (stats, out)), grads = jax.value_and_grad(pass_loss, has_aux=True)(
            trainable, stats, *x)
        return (stats, jax.tree.map(jnp.add, g_sum, grads)), (total, out)

      init = (batch_stats, zeros(trainable))
      (new_stats, g_grads), (totals, outs) = scan(one_pass, init, xs)
      loss_g = totals[0] + totals[1]
      out = {**rename(jax.tree.map(lambda v: v[0], outs), unlabeled_names),
             **rename(jax.tree.map(lambda v: v[1], outs), labeled_names)}
    else:
      def g_loss_fn(trainable):
        total, (stats, out) = 0.0, (batch_stats, {})
        if with_unlabeled:
          total, (stats, out_u) = pass_loss(trainable, stats, batch["unlabeled_image"],
                                            unlabeled_w, unlabeled_mask)
          out = rename(out_u, unlabeled_names)
        lab_total, (stats, out_l) = pass_loss(trainable, stats, batch["image"],
                                              labeled_w, labeled_mask)
        return total + lab_total, (stats, {**out, **rename(out_l, labeled_names)})

      (loss_g, (new_stats, out)), g_grads = jax.value_and_grad(
          g_loss_fn, has_aux=True)(trainable)
    metrics = {k: v for k, v in out.items() if not k.endswith("logits")}
    metrics["loss_g"] = loss_g
    metrics["lr_g"] = g_schedule(step)

    d_grads = None
    if with_d:
      # Fake: S's predictions (constants for D); real: one-hot ground truth.
      fake = [jax.nn.softmax(out["logits"])]
      fake_mask = [labels != ignore]
      if with_unlabeled and lc.d_remain:
        fake.append(jax.nn.softmax(out["unlabeled_logits"]))
        fake_mask.append(jnp.broadcast_to(semi_adv_on, labels.shape))
      fake = jax.lax.stop_gradient(jnp.concatenate(fake))
      fake_mask = jnp.concatenate(fake_mask)
      real_mask = batch["gt_label"] != ignore
      # Tied to S's predictions: otherwise XLA computes the one-hot maps and
      # D's pass on them before S's passes, and keeps them through S's loop.
      real = losses.one_hot_labels(ordering.computed_after(batch["gt_label"], fake),
                                   fake.shape[-1])

      def d_loss_fn(d_params):
        fake_logits, real_logits = d_map(d_params, fake), d_map(d_params, real)
        loss = losses.discriminator_loss(fake_logits, fake_mask, real_logits, real_mask)
        return loss, (fake_logits, real_logits)

      (metrics["loss_d"], (fake_logits, real_logits)), d_grads = jax.value_and_grad(
          d_loss_fn, has_aux=True)(state.d_params)
      metrics["d_acc_fake"] = losses.masked_mean(
          (fake_logits < 0).astype(jnp.float32), fake_mask)
      metrics["d_acc_real"] = losses.masked_mean(
          (real_logits > 0).astype(jnp.float32), real_mask)
      metrics["lr_d"] = d_schedule(step)
    return g_grads, d_grads, new_stats, metrics

  def accumulated_gradients(state, batch):
    """``gradients`` over ``iter_size`` microbatches in one scan: the mean
    gradients, the BN statistics after the last one, the mean measurements."""
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape((-1, iter_size) + x.shape[1:]), 0, 1), batch)

    def one(carry, microbatch):
      stats, g_sum, d_sum = carry
      g_grads, d_grads, stats, metrics = gradients(state, microbatch, stats)
      g_sum = jax.tree.map(jnp.add, g_sum, g_grads)
      d_sum = None if d_grads is None else jax.tree.map(jnp.add, d_sum, d_grads)
      return (stats, g_sum, d_sum), metrics

    init = (state.g_batch_stats, zeros(trainable_leaves(state.g_params, frozen)),
            zeros(state.d_params) if with_d else None)
    (new_stats, g_sum, d_sum), metrics = scan(one, init, micro)
    mean = lambda tree: jax.tree.map(lambda x: x / iter_size, tree)
    metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)
    return mean(g_sum), None if d_sum is None else mean(d_sum), new_stats, metrics

  def train_step(state, batch):
    if iter_size == 1:
      g_grads, d_grads, new_stats, metrics = gradients(state, batch, state.g_batch_stats)
    else:
      g_grads, d_grads, new_stats, metrics = accumulated_gradients(state, batch)
    g_updates, g_opt_state = g_tx.update(
        with_trainable(state.g_params, frozen, g_grads, fill=jnp.zeros_like),
        state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    d_params, d_opt_state = state.d_params, state.d_opt_state
    if d_grads is not None:
      d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
      d_params = optax.apply_updates(state.d_params, d_updates)
    new_state = state.replace(step=state.step + 1, g_params=g_params,
                              g_batch_stats=new_stats, d_params=d_params,
                              g_opt_state=g_opt_state, d_opt_state=d_opt_state)
    return guard_nonfinite(state, new_state, metrics, g_grads, d_grads,
                           nonfinite_policy)

  return train_step
