"""The one training step: S's and D's gradients at the same parameters, both
optimisers applied, measurements returned. A pure function of (state, batch).
"""
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


def _all_finite(tree) -> jnp.ndarray:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guard_nonfinite(state, new_state, metrics, g_grads, d_grads, policy: str):
  """Adds ``metrics["nonfinite"]`` (0, or an OR of the NONFINITE_* bits) and,
  with ``policy="skip"``, keeps ``state`` (step advanced, skip counted) when
  any loss or gradient is not finite. No host sync: the trainer reads the
  flag when it fetches the measurements."""
  losses_ok = _all_finite({k: v for k, v in metrics.items() if k.startswith("loss")})
  g_ok = _all_finite(g_grads)
  d_ok = _all_finite(d_grads) if d_grads is not None else jnp.bool_(True)
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


def uses_unlabeled(loss_config) -> bool:
  """Whether the unlabeled branch exists at all (decided at trace time)."""
  return loss_config.lambda_semi > 0 or loss_config.lambda_semi_adv > 0


def uses_discriminator(loss_config) -> bool:
  return loss_config.lambda_adv > 0 or uses_unlabeled(loss_config)


def make_train_step(loss_config, generator, discriminator, g_tx, d_tx,
                    g_schedule, d_schedule, nonfinite_policy: str = "stop",
                    iter_size: int = 1, sequential_passes: bool = False):
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
  forward pass starts (less memory, less overlap; same result up to rounding).
  """
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
    (g_grads, d_grads or None, S's new BN statistics, measurements)."""
    step = state.step
    labels = batch["label"]
    semi_on = step >= lc.semi_start
    semi_adv_on = step >= lc.semi_start_adv

    def unlabeled_loss(g_params, stats):
      """S's weighted unlabeled terms: (total, (new BN statistics, measurements))."""
      out = {}
      unl_logits, stats = segment(g_params, stats, batch["unlabeled_image"])
      d_unl = d_map(state.d_params, jax.nn.softmax(unl_logits))
      out["loss_semi_adv"] = losses.adversarial_loss(d_unl)
      out["loss_semi"], out["semi_ratio"] = losses.semi_loss(unl_logits, d_unl, lc.t_semi)
      total = (jnp.where(semi_adv_on, lc.lambda_semi_adv, 0.0) * out["loss_semi_adv"]
               + jnp.where(semi_on, lc.lambda_semi, 0.0) * out["loss_semi"])
      if lc.skip_unlabeled_when_mask_empty:
        total = jnp.where(semi_on & (out["semi_ratio"] == 0), 0.0, total)
      out["unlabeled_logits"] = unl_logits
      return total, (stats, out)

    def labeled_loss(g_params, stats, images):
      """S's labeled terms: (total, (new BN statistics, measurements))."""
      out = {}
      logits, stats = segment(g_params, stats, images)
      out["loss_ce"] = losses.cross_entropy(logits, labels)
      total = out["loss_ce"]
      if lc.lambda_adv > 0:
        d_lab = d_map(state.d_params, jax.nn.softmax(logits))
        out["loss_adv"] = losses.adversarial_loss(d_lab, labels != ignore)
        total = total + lc.lambda_adv * out["loss_adv"]
      out["logits"] = logits
      return total, (stats, out)

    grad_fn = lambda fn: jax.value_and_grad(fn, has_aux=True)
    if with_unlabeled and sequential_passes:
      # Unlabeled gradient first, then the labeled pass, as the authors' two
      # backward() calls: the passes' activations are never alive together.
      (loss_u, (stats, out_u)), grads_u = grad_fn(
          lambda p: unlabeled_loss(p, batch_stats))(state.g_params)
      images = ordering.computed_after(batch["image"], grads_u)
      (loss_l, (new_stats, out)), grads_l = grad_fn(
          lambda p: labeled_loss(p, stats, images))(state.g_params)
      loss_g, out = loss_u + loss_l, {**out_u, **out}
      g_grads = jax.tree.map(jnp.add, grads_u, grads_l)
    else:
      def g_loss_fn(g_params):  # Unlabeled first, then labeled, as the authors' code.
        total, (stats, out) = 0.0, (batch_stats, {})
        if with_unlabeled:
          total, (stats, out) = unlabeled_loss(g_params, stats)
        lab_total, (stats, lab_out) = labeled_loss(g_params, stats, batch["image"])
        return total + lab_total, (stats, {**out, **lab_out})

      (loss_g, (new_stats, out)), g_grads = grad_fn(g_loss_fn)(state.g_params)
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
      real = losses.one_hot_labels(batch["gt_label"], fake.shape[-1])

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
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

    def one(carry, microbatch):
      stats, g_sum, d_sum = carry
      g_grads, d_grads, stats, metrics = gradients(state, microbatch, stats)
      g_sum = jax.tree.map(jnp.add, g_sum, g_grads)
      d_sum = None if d_grads is None else jax.tree.map(jnp.add, d_sum, d_grads)
      return (stats, g_sum, d_sum), metrics

    init = (state.g_batch_stats, zeros(state.g_params),
            zeros(state.d_params) if with_d else None)
    (new_stats, g_sum, d_sum), metrics = jax.lax.scan(one, init, micro)
    mean = lambda tree: jax.tree.map(lambda x: x / iter_size, tree)
    metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), metrics)
    return mean(g_sum), None if d_sum is None else mean(d_sum), new_stats, metrics

  def train_step(state, batch):
    if iter_size == 1:
      g_grads, d_grads, new_stats, metrics = gradients(state, batch, state.g_batch_stats)
    else:
      g_grads, d_grads, new_stats, metrics = accumulated_gradients(state, batch)
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
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
