"""Losses on hand-computed cases, including the empty-mask cases."""
import jax
import jax.numpy as jnp
import numpy as np

from advsemiseg_jax import losses


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_ignores_255():
  logits = np.array([[[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
                      [[0.5, 0.5, 3.0], [1.0, 1.0, 1.0]]]], np.float32)  # 1x2x2x3
  labels = np.array([[[0, 255], [2, 1]]])
  lsm = _log_softmax(logits)
  expected = -(lsm[0, 0, 0, 0] + lsm[0, 1, 0, 2] + lsm[0, 1, 1, 1]) / 3
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
  logits = jnp.ones((1, 2, 2, 3))
  labels = jnp.full((1, 2, 2), 255)
  value, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert value == 0.0 and np.all(np.asarray(grad) == 0)


def _bce(z, t):
  return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def test_adversarial_loss_and_mask():
  d = np.array([[[0.3, -2.0], [1.5, 0.0]]], np.float32)
  mask = np.array([[[True, False], [True, True]]])
  expected = (_bce(0.3, 1) + _bce(1.5, 1) + _bce(0.0, 1)) / 3
  np.testing.assert_allclose(losses.adversarial_loss(d, mask), expected, rtol=1e-6)
  np.testing.assert_allclose(losses.adversarial_loss(d), _bce(d, 1).mean(), rtol=1e-6)
  assert losses.adversarial_loss(d, np.zeros_like(mask)) == 0.0


def test_discriminator_loss_halves_each_term():
  fake = np.array([[[1.0, -1.0]], [[0.5, 2.0]]], np.float32)      # labeled + unlabeled
  fake_mask = np.array([[[True, False]], [[True, True]]])
  real = np.array([[[0.2, 3.0]]], np.float32)
  real_mask = np.array([[[True, True]]])
  expected = 0.5 * ((_bce(1.0, 0) + _bce(0.5, 0) + _bce(2.0, 0)) / 3
                    + (_bce(0.2, 1) + _bce(3.0, 1)) / 2)
  got = losses.discriminator_loss(fake, fake_mask, real, real_mask)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  empty = losses.discriminator_loss(fake, np.zeros_like(fake_mask), real,
                                    np.zeros_like(real_mask))
  assert empty == 0.0


def test_one_hot_labels_zero_vector_for_ignored():
  oh = losses.one_hot_labels(jnp.array([[[0, 2, 255]]]), 3)
  np.testing.assert_array_equal(oh[0, 0], [[1, 0, 0], [0, 0, 1], [0, 0, 0]])


def test_semi_loss_keeps_confident_pixels_only():
  logits = np.array([[[[3.0, 0.0], [0.0, 1.0]], [[0.2, 0.1], [-1.0, 2.0]]]], np.float32)
  # sigmoid(d): 0.5, 0.12, 0.88, 0.18 -> keep >= 0.2: pixels 0 and 2
  d = np.array([[[0.0, -2.0], [2.0, -1.5]]], np.float32)
  value, ratio = losses.semi_loss(logits, d, 0.2)
  lsm = _log_softmax(logits)
  expected = -(lsm[0, 0, 0, 0] + lsm[0, 1, 0, 0]) / 2   # argmax targets: 0, 0
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(ratio, 0.5)
  targets, keep = losses.semi_targets(logits, d, 0.2)
  np.testing.assert_array_equal(targets, [[[0, 255], [0, 255]]])


def test_semi_loss_empty_mask_is_zero_and_targets_are_constants():
  logits = jax.random.normal(jax.random.key(0), (1, 3, 3, 4))
  d = jnp.full((1, 3, 3), -10.0)
  value, ratio = losses.semi_loss(logits, d, 0.2)
  assert value == 0.0 and ratio == 0.0
  # Gradient flows through the CE only; D's map gets none.
  d_ok = jnp.zeros((1, 3, 3))
  gd = jax.grad(lambda d: losses.semi_loss(logits, d, 0.2)[0])(d_ok)
  assert np.all(np.asarray(gd) == 0)
  gl = jax.grad(lambda l: losses.semi_loss(l, d_ok, 0.2)[0])(logits)
  assert np.abs(np.asarray(gl)).sum() > 0


def test_masked_mean_empty_is_finite():
  assert losses.masked_mean(jnp.array([1.0, 2.0]), jnp.array([False, False])) == 0.0
