"""The one training step: S's and D's gradients at the same parameters, both
optimisers applied, measurements returned. A pure function of (state, batch).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from advsemiseg_jax import losses
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


def uses_unlabeled(loss_config) -> bool:
  """Whether the unlabeled branch exists at all (decided at trace time)."""
  return loss_config.lambda_semi > 0 or loss_config.lambda_semi_adv > 0


def uses_discriminator(loss_config) -> bool:
  return loss_config.lambda_adv > 0 or uses_unlabeled(loss_config)


def make_train_step(loss_config, generator, discriminator, g_tx, d_tx,
                    g_schedule, d_schedule):
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  ``batch`` holds ``image`` (B,H,W,3), ``label`` (B,H,W) and, when the method
  needs them, ``unlabeled_image`` and ``gt_label`` (D's real examples).
  Which terms exist is fixed by the config; when they switch on
  (``semi_start``, ``semi_start_adv``) is decided inside the compiled step.
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

  def train_step(state, batch):
    step = state.step
    labels = batch["label"]
    semi_on = step >= lc.semi_start
    semi_adv_on = step >= lc.semi_start_adv

    def g_loss_fn(g_params):
      stats = state.g_batch_stats
      out = {}
      total_unl = 0.0
      if with_unlabeled:  # Unlabeled first, then labeled, as the authors' code.
        unl_logits, stats = segment(g_params, stats, batch["unlabeled_image"])
        d_unl = d_map(state.d_params, jax.nn.softmax(unl_logits))
        out["loss_semi_adv"] = losses.adversarial_loss(d_unl)
        out["loss_semi"], out["semi_ratio"] = losses.semi_loss(
            unl_logits, d_unl, lc.t_semi)
        total_unl = (jnp.where(semi_adv_on, lc.lambda_semi_adv, 0.0) * out["loss_semi_adv"]
                     + jnp.where(semi_on, lc.lambda_semi, 0.0) * out["loss_semi"])
        if lc.skip_unlabeled_when_mask_empty:
          total_unl = jnp.where(semi_on & (out["semi_ratio"] == 0), 0.0, total_unl)
        out["unlabeled_logits"] = unl_logits
      logits, stats = segment(g_params, stats, batch["image"])
      out["loss_ce"] = losses.cross_entropy(logits, labels)
      total = out["loss_ce"] + total_unl
      if lc.lambda_adv > 0:
        d_lab = d_map(state.d_params, jax.nn.softmax(logits))
        out["loss_adv"] = losses.adversarial_loss(d_lab, labels != ignore)
        total = total + lc.lambda_adv * out["loss_adv"]
      out["logits"] = logits
      return total, (stats, out)

    (loss_g, (new_stats, out)), g_grads = jax.value_and_grad(
        g_loss_fn, has_aux=True)(state.g_params)
    metrics = {k: v for k, v in out.items() if not k.endswith("logits")}
    metrics["loss_g"] = loss_g
    g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    metrics["lr_g"] = g_schedule(step)

    d_params, d_opt_state = state.d_params, state.d_opt_state
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
      d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
      d_params = optax.apply_updates(state.d_params, d_updates)
      metrics["d_acc_fake"] = losses.masked_mean(
          (fake_logits < 0).astype(jnp.float32), fake_mask)
      metrics["d_acc_real"] = losses.masked_mean(
          (real_logits > 0).astype(jnp.float32), real_mask)
      metrics["lr_d"] = d_schedule(step)

    new_state = state.replace(step=step + 1, g_params=g_params,
                              g_batch_stats=new_stats, d_params=d_params,
                              g_opt_state=g_opt_state, d_opt_state=d_opt_state)
    return new_state, metrics

  return train_step
