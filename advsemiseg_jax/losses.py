"""The paper's losses. Each is a mean over the pixels that count, and is 0
(finite, with zero gradient) when no pixel counts.

Shapes: logits NHWC, labels NHW (int, ``ignore_label`` marks ignored pixels),
discriminator logits NHW.
"""
import jax
import jax.numpy as jnp
import optax

IGNORE_LABEL = 255


def masked_mean(values, mask):
  """Mean of ``values`` over ``mask``; 0 when the mask is empty."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits, labels, ignore_label: int = IGNORE_LABEL):
  """Softmax cross-entropy over pixels whose label is not ``ignore_label``."""
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe)
  return masked_mean(losses, valid)


def bce_with_logits(logits, target: float, mask=None):
  """Binary cross-entropy of D's logits against a constant target."""
  losses = optax.sigmoid_binary_cross_entropy(
      logits, jnp.full_like(logits, target))
  return masked_mean(losses, jnp.ones_like(logits, bool) if mask is None else mask)


def one_hot_labels(labels, num_classes: int, ignore_label: int = IGNORE_LABEL):
  """One-hot NHWC ground truth for D; an ignored pixel is the zero vector."""
  return jax.nn.one_hot(jnp.where(labels == ignore_label, -1, labels),
                        num_classes, dtype=jnp.float32)


def adversarial_loss(d_logits, mask=None):
  """S's adversarial loss: BCE(D(softmax(pred)), 1) over ``mask``."""
  return bce_with_logits(d_logits, 1.0, mask)


def discriminator_loss(fake_logits, fake_mask, real_logits, real_mask):
  """D's loss: (BCE(fake, 0) + BCE(real, 1)) / 2.

  ``fake_logits`` may hold the labeled and the unlabeled predictions stacked
  on the batch axis: as in the authors' code, the fake term is one mean over
  all of their counted pixels.
  """
  return 0.5 * (bce_with_logits(fake_logits, 0.0, fake_mask)
                + bce_with_logits(real_logits, 1.0, real_mask))


def semi_targets(logits, d_logits, t_semi: float, ignore_label: int = IGNORE_LABEL):
  """Self-training targets: argmax(pred) where sigmoid(D) >= T_semi, else ignore.

  Targets and mask are constants (no gradient flows through them).
  """
  logits, d_logits = jax.lax.stop_gradient((logits, d_logits))
  keep = jax.nn.sigmoid(d_logits) >= t_semi
  return jnp.where(keep, jnp.argmax(logits, axis=-1), ignore_label), keep


def semi_loss(logits, d_logits, t_semi: float):
  """Masked self-training cross-entropy and the fraction of kept pixels."""
  targets, keep = semi_targets(logits, d_logits, t_semi)
  return cross_entropy(logits, targets), jnp.mean(keep.astype(jnp.float32))
