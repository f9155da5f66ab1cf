"""Gradient accumulation (optim.iter_size) inside the one compiled step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from advsemiseg_jax.config import base_config
from advsemiseg_jax.step import TrainState, make_train_step

NUM_CLASSES = 3


class LinearSegmenter(nn.Module):
  """Per-pixel linear logits (no BN). ``calls`` in batch_stats counts the
  training forward passes, to see the statistics threaded through in turn."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    calls = self.variable("batch_stats", "calls", jnp.zeros, (), jnp.float32)
    if train and not self.is_initializing():
      calls.value = calls.value + 1
    return nn.Dense(NUM_CLASSES)(x)


class LinearDiscriminator(nn.Module):
  @nn.compact
  def __call__(self, probs):
    return nn.Dense(1)(probs)


def make(iter_size):
  loss = base_config().loss
  loss.semi_start = 0
  loss.t_semi = 0.0          # every unlabeled pixel in L_semi: equal counts per microbatch
  loss.lambda_semi_adv = 0.01
  g, d = LinearSegmenter(), LinearDiscriminator()
  g_vars = g.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
  d_vars = d.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, NUM_CLASSES)))
  g_tx, d_tx = optax.sgd(0.05, momentum=0.9), optax.adam(0.01)
  state = TrainState(step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
                     g_batch_stats=g_vars["batch_stats"], d_params=d_vars["params"],
                     g_opt_state=g_tx.init(g_vars["params"]),
                     d_opt_state=d_tx.init(d_vars["params"]),
                     rng=jax.random.PRNGKey(0))
  step = make_train_step(loss, g, d, g_tx, d_tx, lambda s: 0.05, lambda s: 0.01,
                         iter_size=iter_size)
  return state, jax.jit(step)


def batch(n, seed):
  rng = np.random.RandomState(seed)
  labels = lambda: rng.randint(0, NUM_CLASSES, (n, 6, 5)).astype(np.int32)  # none ignored
  return {"image": rng.randn(n, 6, 5, 3).astype(np.float32), "label": labels(),
          "unlabeled_image": rng.randn(n, 6, 5, 3).astype(np.float32),
          "gt_label": labels()}


def run(iter_size, batches):
  state, step = make(iter_size)
  for b in batches:
    state, metrics = step(state, b)
  return jax.device_get(state), jax.device_get(metrics)


def test_iter_size_2_at_batch_b_equals_one_step_at_batch_2b():
  data = [batch(8, seed) for seed in range(3)]
  full, m_full = run(1, data)
  accumulated, m_acc = run(2, data)
  for key in ("g_params", "d_params", "g_opt_state", "d_opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(full, key)),
                    jax.tree.leaves(getattr(accumulated, key))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=key)
  for k in ("loss_ce", "loss_adv", "loss_semi", "loss_semi_adv", "loss_d", "loss_g"):
    np.testing.assert_allclose(m_full[k], m_acc[k], rtol=2e-5, err_msg=k)
  # Two forward passes (unlabeled, labeled) per microbatch, statistics in turn.
  assert float(full.g_batch_stats["calls"]) == 3 * 2
  assert float(accumulated.g_batch_stats["calls"]) == 3 * 2 * 2
  assert int(accumulated.step) == 3


def test_microbatches_are_not_the_whole_batch():
  """Half of the batch alone moves the parameters elsewhere (the comparison
  above is not vacuous)."""
  data = [batch(8, seed) for seed in range(3)]
  full, _ = run(1, data)
  half, _ = run(1, [{k: v[::2] for k, v in b.items()} for b in data])
  diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full.g_params),
                                                jax.tree.leaves(half.g_params))]
  assert max(diffs) > 1e-3
