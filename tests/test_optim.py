"""Optimiser rules: coverage, 10x head, frozen BN, weight decay, schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advsemiseg_jax import optim
from advsemiseg_jax.config import base_config
from advsemiseg_jax.models import DeepLabV2
from conftest import hlo_instructions


@pytest.fixture(scope="module")
def params():
  model = DeepLabV2(num_classes=3, stage_sizes=(1, 1, 1, 1), width=4)
  return model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)))["params"]


def _cfg(**kw):
  c = base_config().optim
  c.update(kw)
  return c


def test_every_parameter_is_covered_and_labels_are_right(params):
  labels = optim.param_paths(optim.rule_labels(params, optim.DEFAULT_G_RULES))
  assert labels["layer1_0/bn1/scale"] == "rule0"
  assert labels["layer1_0/downsample_bn/bias"] == "rule0"
  assert labels["bn1/scale"] == "rule0"
  assert labels["layer5/conv2d_list_3/bias"] == "rule1"
  assert labels["layer2_0/conv2/kernel"] == "rule2"
  assert labels["layer2_0/downsample_conv/kernel"] == "rule2"
  assert set(labels.values()) == {"rule0", "rule1", "rule2"}


def test_frozen_mask_marks_the_rules_with_lr_mult_zero(params):
  """The parameters the train step leaves out of differentiation."""
  frozen = optim.param_paths(optim.frozen_mask(params, optim.REFERENCE_G_RULES))
  assert frozen.keys() == optim.param_paths(params).keys()
  assert frozen["bn1/scale"] and frozen["layer1_0/downsample_bn/bias"]
  assert frozen["layer5/conv2d_list_2/kernel"] and frozen["layer5/conv2d_list_3/bias"]
  assert not frozen["layer5/conv2d_list_0/kernel"] and not frozen["layer2_0/conv2/kernel"]
  assert not any(optim.param_paths(optim.frozen_mask(params, ((r".*", 1.0, True),))).values())


def test_uncovered_parameter_and_unused_rule_fail(params):
  with pytest.raises(ValueError, match="cover no rule"):
    optim.rule_labels(params, ((r"^layer5/", 10.0, True),))
  with pytest.raises(ValueError, match="match no parameter"):
    optim.rule_labels(params, optim.DEFAULT_G_RULES[:2] + ((r"^nothing/", 1.0, True),)
                      + optim.DEFAULT_G_RULES[2:])


def test_first_update_lr_head_bn_and_weight_decay(params):
  cfg = _cfg(lr_g=0.1, weight_decay=0.01, nesterov=False)
  tx, _ = optim.generator_optimizer(cfg, params, num_steps=100)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat_u, flat_p = optim.param_paths(updates), optim.param_paths(params)
  # First step: buffer = g + wd * p, update = -lr * buffer.
  k = "layer2_0/conv2/kernel"
  np.testing.assert_allclose(flat_u[k], -0.1 * (1 + 0.01 * flat_p[k]), rtol=1e-6)
  k = "layer5/conv2d_list_0/kernel"
  np.testing.assert_allclose(flat_u[k], -1.0 * (1 + 0.01 * flat_p[k]), rtol=1e-6)
  for k in ("bn1/scale", "layer1_0/bn3/bias", "layer4_0/downsample_bn/scale"):
    assert np.all(np.asarray(flat_u[k]) == 0)


def test_weight_decay_mask(params):
  rules = ((r"(^|/)(bn\d|downsample_bn)/", 0.0, False), (r"/bias$", 1.0, False),
           (r".*", 1.0, True))
  cfg = _cfg(lr_g=1.0, weight_decay=0.5, nesterov=False, g_rules=rules)
  tx, _ = optim.generator_optimizer(cfg, params, num_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  flat_u = optim.param_paths(tx.update(zeros, tx.init(params), params)[0])
  flat_p = optim.param_paths(params)
  assert np.all(np.asarray(flat_u["layer5/conv2d_list_0/bias"]) == 0)
  np.testing.assert_allclose(flat_u["layer5/conv2d_list_0/kernel"],
                             -0.5 * flat_p["layer5/conv2d_list_0/kernel"], rtol=1e-6)


def test_momentum_and_nesterov_match_torch_formulas():
  p = {"w": jnp.array([1.0, -2.0])}
  rules = ((r".*", 1.0, True),)
  g1, g2 = jnp.array([0.5, 1.0]), jnp.array([-1.0, 0.25])
  for nesterov in (False, True):
    cfg = _cfg(lr_g=0.1, weight_decay=0.1, nesterov=nesterov, power=0.0, g_rules=rules)
    tx, _ = optim.generator_optimizer(cfg, p, num_steps=10)
    state, params = tx.init(p), p
    # torch.optim.SGD by hand.
    w, buf = np.array([1.0, -2.0]), None
    for g in (g1, g2):
      upd, state = tx.update({"w": g}, state, params)
      params = optax.apply_updates(params, upd)
      d = np.asarray(g) + 0.1 * w
      buf = d if buf is None else 0.9 * buf + d
      w = w - 0.1 * (d + 0.9 * buf if nesterov else buf)
      np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_poly_schedules():
  s = optim.poly_schedule(2.5e-4, 1000, 0.9)
  assert s(0) == pytest.approx(2.5e-4)
  assert s(500) == pytest.approx(2.5e-4 * 0.5**0.9, rel=1e-5)
  assert s(1000) == pytest.approx(0.0)
  _, sched = optim.discriminator_optimizer(_cfg(lr_d=1e-4), 100)
  assert sched(10) == pytest.approx(1e-4 * 0.9**0.9, rel=1e-5)


def test_adam_matches_torch_betas():
  p = {"w": jnp.array([1.0])}
  tx, _ = optim.discriminator_optimizer(_cfg(lr_d=0.1, power=0.0), 10)
  state = tx.init(p)
  upd, state = tx.update({"w": jnp.array([2.0])}, state, p)
  # First Adam step: m_hat = g, v_hat = g^2 -> update = -lr * g / (|g| + eps).
  np.testing.assert_allclose(upd["w"], [-0.1 * 2 / (2 + 1e-8)], rtol=1e-6)
  upd, state = tx.update({"w": jnp.array([1.0])}, state, p)
  m = (0.1 * 2 * 0.9 + 0.1 * 1) / (1 - 0.9**2)
  v = (0.01 * 4 * 0.99 + 0.01 * 1) / (1 - 0.99**2)
  np.testing.assert_allclose(upd["w"], [-0.1 * m / (np.sqrt(v) + 1e-8)], rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("in_order", [True, False])
def test_sgd_is_optax_sgd_bit_for_bit(nesterov, weight_decay, in_order):
  """``optim.sgd`` with one repeat (written out for XLA:CPU's memory) gives
  optax's weight decay + SGD exactly, over steps with a decaying rate, with
  the parameters updated in order (the CPU's default) or side by side."""
  rng = np.random.RandomState(0)
  params = {"a": jnp.asarray(rng.randn(7, 5), jnp.float32),
            "b": jnp.asarray(rng.randn(3), jnp.float32)}
  schedule = optim.poly_schedule(2.5e-2, 100, 0.9)
  ref = optax.chain(optax.add_decayed_weights(weight_decay),
                    optax.sgd(schedule, momentum=0.9, nesterov=nesterov))
  ours = optim.sgd(schedule, 0.9, weight_decay, nesterov=nesterov, in_order=in_order)
  p_ref, p_ours = params, params
  s_ref, s_ours = ref.init(params), ours.init(params)
  for _ in range(4):
    g = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), params)
    u, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    u, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("repeats", [2, 3, 4])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("in_order", [True, False])
def test_repeated_sgd_is_torchs_appearances_in_turn(repeats, nesterov, in_order):
  """``repeats > 1`` (closed form, ``optim.repeated_coefficients``) against
  torch's single-tensor SGD by hand in float64: each appearance in turn
  decays, updates the buffer and moves the parameter; on the first step each
  appearance starts a fresh buffer. Four steps with a decaying rate."""
  rng = np.random.RandomState(1)
  params = {"a": jnp.asarray(rng.randn(6, 5), jnp.float32),
            "b": jnp.asarray(rng.randn(4), jnp.float32)}
  lr0, wd, mom = 0.05, 0.01, 0.9
  schedule = optim.poly_schedule(lr0, 10, 0.9)
  tx = optim.sgd(schedule, mom, wd, repeats, nesterov=nesterov, in_order=in_order)
  state, ours = tx.init(params), params
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  bufs = {k: np.zeros_like(v) for k, v in ref.items()}
  update = jax.jit(tx.update)
  for step in range(4):
    grads = {k: rng.randn(*v.shape).astype(np.float32) for k, v in ref.items()}
    u, state = update(jax.tree.map(jnp.asarray, grads), state, ours)
    ours = optax.apply_updates(ours, u)
    lr = lr0 * (1 - step / 10) ** 0.9
    for k in ref:
      for _ in range(repeats):
        d = grads[k] + wd * ref[k]
        bufs[k] = d if step == 0 else mom * bufs[k] + d
        ref[k] = ref[k] - lr * (d + mom * bufs[k] if nesterov else bufs[k])
    for k in ref:
      change = np.abs(ref[k] - np.asarray(params[k], np.float64)).max()
      assert np.abs(np.asarray(ours[k], np.float64) - ref[k]).max() <= 1e-5 * change, (step, k)
      np.testing.assert_allclose(state.momentum[k], bufs[k], rtol=1e-5, atol=1e-5)


def _compiled_size(n_leaves: int, repeats: int = 1) -> int:
  """HLO instructions of one in-order ``optim.sgd`` update of ``n_leaves``
  parameters (the test process runs without the YNNPACK fusions, which used
  to hide the chain)."""
  params = {f"p{i:03d}": jnp.ones((8, 8 + i % 3)) for i in range(n_leaves)}
  tx = optim.sgd(0.01, 0.9, 5e-4, repeats=repeats, in_order=True)
  return hlo_instructions(jax.jit(tx.update).lower(params, tx.init(params), params).compile())


def test_in_order_sgd_compiles_to_a_linear_program():
  """Each parameter's update is tied to the one before (``ordering``); XLA
  must not recompute the chain's earlier links inside every update. It did:
  twice the parameters gave four times the program (a ResNet-101 step: 0.94
  million instructions, 2.8 GiB held by the executable)."""
  small, large = _compiled_size(16), _compiled_size(32)
  assert large / small < 2.5, (small, large)
  # Repeats are one update per parameter whose scalars come out of one loop:
  # not three updates, nor the scalars' arithmetic inside every update.
  repeated = _compiled_size(32, repeats=3)
  assert repeated < 1.2 * large, (large, repeated)
