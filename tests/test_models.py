"""Generator and discriminator: sizes, layers, BN modes, ASPP branches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsemiseg_jax.models import (DeepLabV2, FCDiscriminator, ImageDiscriminator,
                                   confidence_logits, layers)


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("num_classes, expected", [(21, 44_048_532), (19, 43_901_068)])
def test_resnet101_parameter_count(num_classes, expected):
  model = DeepLabV2(num_classes=num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3))))
  assert _count(variables["params"]) == expected
  bn = {k: v for k, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  bn_count = sum(int(np.prod(v.shape)) for k, v in bn.items()
                 if any("bn" in str(p) for p in k))
  assert bn_count == 105_344


@pytest.mark.parametrize("hw, out_hw", [((321, 321), (41, 41)), ((505, 505), (64, 64)),
                                        ((512, 1024), (65, 129))])
def test_generator_output_sizes(hw, out_hw):
  model = DeepLabV2(num_classes=21)
  x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3))))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert out.shape == (1, *out_hw, 21)


def test_discriminator_size_and_output():
  d = FCDiscriminator()
  v = jax.eval_shape(lambda: d.init(jax.random.key(0), jnp.zeros((1, 321, 321, 21))))
  assert _count(v["params"]) == 2_783_169
  out = jax.eval_shape(lambda v, x: d.apply(v, x), v,
                       jax.ShapeDtypeStruct((2, 321, 321, 21), jnp.float32))
  assert out.shape == (2, 10, 10, 1)


def test_image_discriminator_gives_one_logit_broadcast_to_pixels():
  d = ImageDiscriminator(width=4)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 48, 5))
  v = d.init(jax.random.key(0), x)
  out = d.apply(v, x)
  assert out.shape == (2, 1, 1, 1)
  conf = confidence_logits(out, (64, 48))
  np.testing.assert_allclose(conf, jnp.broadcast_to(out[:, :, :, 0], (2, 64, 48)))


def _resize_per_pixel(x, out_h, out_w):
  """The align_corners=True formula, one output pixel at a time."""
  n, h, w, c = x.shape
  out = np.zeros((n, out_h, out_w, c), np.float64)
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("in_hw, out_hw", [((5, 7), (17, 31)), ((41, 41), (321, 321)),
                                           ((9, 4), (3, 2)), ((1, 1), (4, 5)),
                                           ((6, 6), (6, 6))])
def test_resize_bilinear_matches_per_pixel_formula(in_hw, out_hw):
  x = np.random.RandomState(0).randn(2, *in_hw, 3)
  got = layers.resize_bilinear(jnp.asarray(x, jnp.float32), out_hw)
  np.testing.assert_allclose(got, _resize_per_pixel(x, *out_hw), atol=1e-5)


def test_resize_bilinear_keeps_corners():
  x = jax.random.normal(jax.random.key(0), (1, 10, 13, 2))
  y = layers.resize_bilinear(x, (37, 50))
  for (a, b), (c, d) in [((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))]:
    np.testing.assert_allclose(y[0, a, b], x[0, c, d], atol=1e-6)


@pytest.mark.parametrize("size", [161, 256, 7, 8])
def test_max_pool_ceil_mode_matches_torch_rule(size):
  x = jax.random.normal(jax.random.key(0), (1, size, size + 3, 2))
  y = layers.max_pool_ceil(x, 3, 2, 1)
  # torch: out = ceil((n + 2p - k) / s) + 1, minus one if the last window
  # would start in the right padding.
  def torch_out(n):
    o = -(-(n + 2 - 3) // 2) + 1
    return o - 1 if (o - 1) * 2 >= n + 1 else o
  assert y.shape[1:3] == (torch_out(size), torch_out(size + 3))
  xp = np.pad(np.asarray(x), ((0, 0), (1, 4), (1, 4), (0, 0)), constant_values=-np.inf)
  for i in range(y.shape[1]):
    for j in range(y.shape[2]):
      np.testing.assert_allclose(y[0, i, j], xp[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((0, 1)))


def _tiny(**kw):
  return DeepLabV2(num_classes=3, stage_sizes=(1, 1, 1, 1), width=4, **kw)


def test_batch_norm_modes():
  x = jax.random.normal(jax.random.key(0), (2, 33, 33, 3)) * 3 + 1
  model = _tiny()
  v = jax.jit(model.init)(jax.random.key(1), x)   # (jitted: one compile, not op by op)
  train_apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))
  _, upd = train_apply(model)(v, x)
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
  frozen = _tiny(bn_mode="frozen")
  out_f, upd_f = train_apply(frozen)(v, x)
  jax.tree.map(np.testing.assert_array_equal, upd_f["batch_stats"], v["batch_stats"])
  np.testing.assert_allclose(out_f, jax.jit(model.apply)(v, x), atol=1e-5)


def test_batch_norm_matches_torch_update():
  """Running mean/var move with momentum 0.1 (torch) and the unbiased variance."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5)) * 2 + 3
  bn = layers.BatchNorm()
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  np.testing.assert_allclose(y.reshape(-1, 5), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                             atol=1e-4)


@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_act_values_and_gradients_equal_autodiff(residual, relu, dtype):
  """``batch_norm_act``'s written-out backward pass against JAX's derivative
  of the same formula in float32 (for bf16 inputs too), with cotangents on
  all three outputs and, in float32, a constant channel (raw variance ~0,
  clamped; in bf16 its normalised values are rounding noise)."""
  kx, kr, ks, kb, kg = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(kx, (2, 5, 7, 6)) * 3 + 1
  if dtype == jnp.float32:
    x = x.at[..., 2].set(0.3)
  x = x.astype(dtype)
  res = (jax.random.normal(kr, x.shape) if residual else jnp.zeros(x.shape)).astype(dtype)
  scale = jax.random.normal(ks, (6,)) + 1
  bias = jax.random.normal(kb, (6,))

  def reference(x, scale, bias, res):
    xf = x.astype(jnp.float32)
    mean = xf.mean((0, 1, 2))
    var = jnp.maximum((xf * xf).mean((0, 1, 2)) - mean * mean, 0.0)
    mul = scale * jax.lax.rsqrt(var + 1e-5)
    y = xf * mul + (bias - mean * mul) + res.astype(jnp.float32)
    return (jax.nn.relu(y) if relu else y).astype(dtype), mean, var

  def fused(x, scale, bias, res):
    return layers.batch_norm_act(x, scale, bias, res if residual else None, relu, 1e-5)

  got, got_vjp = jax.vjp(fused, x, scale, bias, res)
  want, want_vjp = jax.vjp(reference, x, scale, bias, res)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
  gy = jax.random.normal(kg, x.shape).astype(dtype)
  zeros = jnp.zeros((6,))
  for cotangents in [(gy, zeros, zeros),   # the loss's path, then the statistics'
                     (jnp.zeros_like(gy), jnp.linspace(-1.0, 1.0, 6), jnp.linspace(0.5, -0.5, 6))]:
    grads, want_grads = got_vjp(cotangents), want_vjp(cotangents)
    for name, a, b in zip(["x", "scale", "bias", "residual"], grads, want_grads):
      if name == "residual" and not residual:
        continue
      assert a.dtype == b.dtype, name
      # The constant channel's scale gradient is rounding noise (x - mean ~ 1e-8
      # times invstd ~ 316) in both: compare it at the array's largest value.
      largest = float(jnp.abs(b.astype(jnp.float32)).max())
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol,
                                 atol=max(tol, 1e-4) * largest, err_msg=name)


def test_two_branch_aspp_uses_only_dilations_6_and_12():
  x = jax.random.normal(jax.random.key(0), (1, 65, 65, 3))
  model2, model4 = _tiny(aspp_branches=2), _tiny()
  v = jax.jit(model4.init)(jax.random.key(1), x)

  def grads(model):
    loss = lambda params: jnp.sum(model.apply({**v, "params": params}, x) ** 2)
    return jax.jit(jax.grad(loss))(v["params"])["layer5"]

  g2, g4 = grads(model2), grads(model4)
  for i in (0, 1):
    assert np.abs(g2[f"conv2d_list_{i}"]["kernel"]).sum() > 0
  for i in (2, 3):
    assert np.abs(g2[f"conv2d_list_{i}"]["kernel"]).sum() == 0
    assert np.abs(g4[f"conv2d_list_{i}"]["kernel"]).sum() > 0
  assert not np.allclose(jax.jit(model2.apply)(v, x), jax.jit(model4.apply)(v, x))
