"""The convolution implementation switch, rematerialisation and XLA flags:
same parameters and same results as the default implementation."""
import collections
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from advsemiseg_jax import build, parallel
from advsemiseg_jax.models import DeepLabV2, layers
from conftest import ROOT, XLA_LLVM_DEFAULTS, hlo_instructions, xla_flags


def _sin_loss_gradients(model, variables, x):
  """Gradients of ``sum(sin(model(x)))`` in the variables and the input."""
  loss = lambda v, x: jnp.sum(jnp.sin(model.apply(v, x)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)


@pytest.mark.parametrize("stride,features", [(1, 6), (2, 6), (1, 3)])
def test_dot_conv_equals_lax_conv(stride, features):
  """Values and gradients; ``conv1x1``'s kernel gradient transposes x (5
  channels in, 6 out) or the output gradient (3 out)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 5))
  ref = nn.Conv(features, (1, 1), strides=stride, use_bias=True)
  variables = ref.init(jax.random.PRNGKey(1), x)
  variables = jax.tree.map(lambda v: v + 0.3, variables)  # non-zero bias
  dot = layers.conv_module("dot")(features, (1, 1), strides=stride, use_bias=True)
  assert isinstance(dot, layers.DotConv)
  assert jax.tree.structure(dot.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(dot.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  got, want = _sin_loss_gradients(dot, variables, x), _sin_loss_gradients(ref, variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_summed_dilated_convs_equal_lax_conv():
  """Map 9x7 against dilations 6..24: most taps fall in the padding."""
  keys = jax.random.split(jax.random.PRNGKey(0), 9)
  x = jax.random.normal(keys[0], (2, 9, 7, 8))
  dilations = (6, 12, 18, 24)
  kernels = [jax.random.normal(k, (3, 3, 8, 5)) for k in keys[1:5]]
  biases = [jax.random.normal(k, (5,)) for k in keys[5:9]]
  expected = sum(
      lax.conv_general_dilated(x, k, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                               dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
      for k, b, d in zip(kernels, biases, dilations))
  got = layers.summed_dilated_convs(x, kernels, biases, dilations)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_shifted_sum_gradient_and_memory(monkeypatch):
  """The ASPP head's shift-and-add: the written-out backward pass gives
  autodiff's gradient, and XLA plans a small fraction of autodiff's memory
  for the head's gradient (which padded every tap's gradient to full size)."""
  h, w, c, k = 23, 19, 16, 5
  offsets = []
  for d in (6, 12, 18, 24):
    offsets += [o for _, o, inside in layers.tap_offsets(d, h, w)
                if inside and o not in offsets]
  y = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, len(offsets), k))
  for fn in (layers.shifted_sum, layers._shifted_sum):
    assert fn(y, tuple(offsets)).shape == (2, h, w, k)
  grad = lambda fn: jax.grad(lambda y: jnp.sum(jnp.sin(fn(y, tuple(offsets)))))(y)
  np.testing.assert_allclose(grad(layers.shifted_sum), grad(layers._shifted_sum),
                             rtol=1e-6, atol=1e-6)

  x = jax.random.normal(jax.random.PRNGKey(1), (2, h, w, c))
  kernels = [jnp.full((3, 3, c, k), 0.01) for _ in range(4)]

  def temp_bytes(shifted_sum):
    with monkeypatch.context() as m:
      m.setattr(layers, "shifted_sum", shifted_sum)
      loss = lambda x, ks: jnp.sum(jnp.sin(layers.summed_dilated_convs(
          x, ks, [jnp.zeros(k)] * 4, (6, 12, 18, 24))))
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernels).compile()
      return compiled.memory_analysis().temp_size_in_bytes

  ratio = temp_bytes(layers.shifted_sum) / temp_bytes(layers._shifted_sum)
  assert ratio < 0.25, ratio


def test_initialiser_plans_less_memory_same_values():
  """``build._run_init`` compiles the initialiser with XLA:CPU's
  memory-optimising scheduler (and LLVM's optimisation level 1, a fraction
  of the compile time): same parameters, bit for bit, a fraction of the
  memory (the default scheduler runs every parameter's initialiser side by
  side). Compared with a compile at XLA's defaults: the suite's own LLVM
  level 0 (conftest.py) rounds differently."""
  model = DeepLabV2(num_classes=5, stage_sizes=(2, 2, 4, 2), width=16)
  init = lambda r: model.init(r, jnp.zeros((1, 33, 33, 3)), train=False)
  rng = jax.random.PRNGKey(0)
  lowered = jax.jit(init).lower(rng)
  plan = lambda options: lowered.compile(
      compiler_options=options).memory_analysis().temp_size_in_bytes
  ratio = plan(build._CPU_INIT_OPTIONS) / plan(None)
  assert ratio < 0.5, ratio
  for a, b in zip(jax.tree.leaves(build._run_init(init, rng)),
                  jax.tree.leaves(lowered.compile(compiler_options=XLA_LLVM_DEFAULTS)(rng))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("conv", ["3x3", "4x4_s2"])
def test_backward_flips_a_copy_of_the_kernel_taken_after_dy(conv, monkeypatch):
  """The backward passes of ``dilated_conv3x3`` and ``conv4x4_s2`` flip a
  copy of the kernel taken after dy (``ordering.copied_after``: a gather
  whose indices depend on dy). Flipping the kernel itself, XLA flipped every
  layer's at the start of the step and kept the copies to the end (0.09 GiB
  of the 161 ResNet-101 step's peak); it moves an addition of zero past the
  flip, not a gather's indices. Same gradients either way."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
  if conv == "3x3":
    kernel, fn = jnp.ones((3, 3, 4, 6)), lambda k: layers.dilated_conv3x3(x, k, 2)
  else:
    kernel, fn = jnp.ones((4, 4, 4, 6)), lambda k: layers.conv4x4_s2(x, k)
  loss = lambda k: (lambda y: jnp.sum(jnp.sin(y) + y ** 2))(fn(k))
  grad = lambda k: jax.jit(jax.grad(loss))(k)
  want = grad(kernel * 0.1)
  calls, copied_after = [], layers.ordering.copied_after

  def spy(value, tree):
    calls.append((value.shape, [leaf.shape for leaf in jax.tree.leaves(tree)]))
    out = copied_after(value, tree)
    assert "gather" in str(jax.make_jaxpr(copied_after)(value, tree))
    return out

  monkeypatch.setattr(layers.ordering, "copied_after", spy)
  np.testing.assert_array_equal(grad(kernel * 0.1), want)
  dy_shape = jax.eval_shape(fn, kernel).shape
  assert calls == [(kernel.shape, [dy_shape])], calls


def test_unknown_conv_impl_fails():
  with pytest.raises(ValueError, match="conv_impl"):
    layers.conv_module("winograd")


def _grads(model, variables, x):
  """Gradients of a training-mode loss, and the updated BN statistics."""
  def loss(params):
    out, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               x, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2), updated
  return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("conv_impl,remat,bn_backward", [
    ("xla", (1, 3), "written"), ("dot", (2, 4), "written"), ("dot", (), "autodiff"),
    ("dot", (), "recompute"), ("xla", (2,), "recompute")])
def test_deeplab_variants_match_the_default(conv_impl, remat, bn_backward):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 41, 33, 3)) * 30
  kwargs = dict(num_classes=5, stage_sizes=(1, 1, 1, 1), width=8, aspp_branches=2)
  ref = DeepLabV2(**kwargs)
  variables = jax.jit(ref.init)(jax.random.PRNGKey(0), x)   # (jitted: not op by op)
  model = DeepLabV2(conv_impl=conv_impl, remat_stages=remat, bn_backward=bn_backward, **kwargs)
  same_init = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(same_init)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(variables) == jax.tree.structure(same_init)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x),
                             jax.jit(ref.apply)(variables, x), rtol=1e-4, atol=1e-4)
  (grads, stats), (want_grads, want_stats) = _grads(model, variables, x), _grads(ref, variables, x)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_stages_plan_less_memory_on_cpu():
  """``remat_call`` keeps only block inputs, and XLA:CPU cannot move its
  recomputation back into the forward pass (as it does ``nn.remat``'s: with
  it, the plan was the same as without). Two passes share the statistics,
  as the train step's unlabeled and labeled passes do."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 65, 65, 3))
  kwargs = dict(num_classes=5, stage_sizes=(2, 2, 4, 2), width=8)
  variables = jax.jit(DeepLabV2(**kwargs).init)(jax.random.PRNGKey(0), x)

  def temp_bytes(remat_stages):
    model = DeepLabV2(remat_stages=remat_stages, conv_impl="dot", **kwargs)

    def loss(params):
      stats = variables["batch_stats"]
      total = 0.0
      for images in (x, -x):
        out, updated = model.apply({"params": params, "batch_stats": stats}, images,
                                   train=True, mutable=["batch_stats"])
        total, stats = total + jnp.sum(out ** 2), updated["batch_stats"]
      return total, stats

    step = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"]).compile()
    step(variables["params"])   # runs (no closed-over tracer left behind)
    return step.memory_analysis().temp_size_in_bytes

  ratio = temp_bytes((1, 2, 3, 4)) / temp_bytes(())
  assert ratio < 0.7, ratio


@pytest.mark.parametrize("mode", ["recompute", "recompute_act"])
def test_recomputed_activations_are_not_kept_and_give_the_same_gradients(capsys, mode):
  """``bn_backward=recompute``: a BatchNorm + ReLU feeding a convolution
  keeps only its input, the convolution's input (two per bottleneck) being
  recomputed in the backward pass (``layers.batch_norm_act_then``), and so
  is a bottleneck's conv3 output, bn3's input. ``recompute_act`` keeps the
  conv3 output. The gradients and statistics (bn3's running averages,
  updated inside the fused op, included) equal the written backward's."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 65, 65, 3)) * 30
  stages = (2, 1, 3, 1)
  kwargs = dict(num_classes=5, stage_sizes=stages, width=8, conv_impl="dot")
  variables = jax.jit(DeepLabV2(**kwargs).init)(jax.random.PRNGKey(0), x)
  written, recomputed = (DeepLabV2(bn_backward=b, **kwargs) for b in ("written", mode))
  (grads, stats), (want_grads, want_stats) = (_grads(m, variables, x)
                                              for m in (recomputed, written))
  assert jax.tree.structure(stats) == jax.tree.structure(want_stats)
  for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((want_grads, want_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))

  def kept(model):
    def loss(params):
      return jnp.sum(model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])[0] ** 2)
    print_saved_residuals(loss, variables["params"])
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()]

  # The activations (batch 2, NHWC) kept for the backward pass.
  full, lean = (collections.Counter(s for s in kept(m) if s.startswith("f32[2,"))
                for m in (written, recomputed))
  dropped = full - lean
  assert not lean - full, lean - full
  # Per bottleneck: bn1's and bn2's outputs, `planes` (8 * 2**stage)
  # channels wide, and with recompute conv3's output, 4 * planes wide.
  channels = collections.Counter()
  for shape, count in dropped.items():
    channels[int(shape.rsplit(",", 1)[1].rstrip("]"))] += count
  want = collections.Counter()
  for i, blocks in enumerate(stages):
    want[8 * 2**i] += 2 * blocks
    if mode == "recompute":
      want[32 * 2**i] += blocks
  assert channels == want, (channels, want)


def test_recomputed_activations_plan_less_memory_under_the_cpu_flags():
  """Under the XLA:CPU flags main.py sets (in a subprocess: they are read
  when the backend starts), XLA plans less for the gradient with
  ``bn_backward=recompute`` than with ``written``."""
  script = textwrap.dedent("""
      import sys
      from advsemiseg_jax import parallel
      parallel.set_default_xla_flags()
      import jax, jax.numpy as jnp
      from advsemiseg_jax.models.deeplab import DeepLabV2
      x = jax.random.normal(jax.random.PRNGKey(1), (2, 65, 65, 3)) * 30
      kwargs = dict(num_classes=5, stage_sizes=(2, 2, 4, 2), width=32, conv_impl="dot")
      variables = jax.jit(DeepLabV2(**kwargs).init)(jax.random.PRNGKey(0), x)
      for mode in ("written", "recompute"):
        model = DeepLabV2(bn_backward=mode, **kwargs)
        def loss(params):
          out, updated = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])
          return jnp.sum(out ** 2), updated
        step = jax.jit(jax.grad(loss, has_aux=True)).lower(variables["params"]).compile()
        print(step.memory_analysis().temp_size_in_bytes)
      """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert out.returncode == 0, out.stderr[-3000:]
  written, recomputed = (int(v) for v in out.stdout.split())
  # At least a quarter of the written backward's plan (measured: 9.5 -> 5.8
  # MiB; 8.3 with bn3's input kept).
  assert recomputed < 0.75 * written, (written, recomputed)


def test_xla_flags_added_but_user_setting_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  flags = parallel.set_default_xla_flags()
  assert "--xla_force_host_platform_device_count=2" in flags
  assert parallel.CPU_XLA_FLAGS[0] in flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert parallel.set_default_xla_flags() == "--xla_cpu_experimental_ynn_fusion_type="
  monkeypatch.setenv("XLA_FLAGS", "")
  assert parallel.set_default_xla_flags(enable=False) == ""


@pytest.mark.parametrize("widths", [(8,), (40,), (16, 16, 16)])
def test_kernel_gradients_are_products_xla_cannot_fold(widths, monkeypatch):
  """``kernel_gradients`` gives ``x^T dy`` for one narrower output gradient
  (``dy^T`` written out), one wider one and several (``x^T`` written out
  once, from a copy of ``x`` read after the first ``dy``); XLA:CPU keeps
  every product in YNNPACK's layout (the left operand contracting over its
  last dimension) instead of folding the transposes back into Eigen's."""
  keys = jax.random.split(jax.random.PRNGKey(0), len(widths) + 1)
  x = jax.random.normal(keys[0], (96, 24))
  dys = [jax.random.normal(k, (96, w)) for k, w in zip(keys[1:], widths)]
  calls, computed_after = [], layers.ordering.computed_after

  def spy(value, tree):
    calls.append((value.shape, [leaf.shape for leaf in jax.tree.leaves(tree)]))
    return computed_after(value, tree)

  monkeypatch.setattr(layers.ordering, "computed_after", spy)
  fn = jax.jit(layers.kernel_gradients)
  got = fn(x, dys)
  written_x = widths[0] > x.shape[1] or len(widths) > 1
  assert calls == ([(x.shape, [dys[0].shape])] if written_x else []), calls
  for g, tn, dy in zip(got, layers._kernel_gradients_tn(x, dys), dys):
    want = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
    assert g.shape == want.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tn, want, rtol=1e-5, atol=1e-4)
  hlo = fn.lower(x, dys).compile().as_text()
  assert hlo.count(" dot(") == len(widths)
  assert "lhs_contracting_dims={0}" not in hlo
  assert "lhs_contracting_dims={1}" in hlo


@pytest.mark.parametrize("dilation", [1, 2, 5])
def test_dilated_conv3x3_values_and_gradients_equal_lax_conv(dilation):
  """Map 4x6: with dilation 5 the vertical taps read only padding."""
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 4, 6, 5))
  kernel = jax.random.normal(kk, (3, 3, 5, 7))
  dy = jax.random.normal(kg, (2, 4, 6, 7))
  d = dilation

  def ref(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  got, got_vjp = jax.vjp(lambda x, k: layers.dilated_conv3x3(x, k, d), x, kernel)
  want, want_vjp = jax.vjp(ref, x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_vjp(dy), want_vjp(dy)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv3x3_module_has_nn_conv_parameters_and_bf16_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
  ref = nn.Conv(3, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=2)
  variables = ref.init(jax.random.PRNGKey(1), x)
  conv = layers.conv_module("dot")(3, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=2)
  assert isinstance(conv, layers.Conv3x3)
  assert jax.tree.structure(conv.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
  np.testing.assert_allclose(conv.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  bf16 = layers.Conv3x3(3, dilation=2, dtype=jnp.bfloat16)
  grads = jax.grad(lambda v: jnp.sum(bf16.apply(v, x).astype(jnp.float32) ** 2))(variables)
  want = jax.grad(lambda v: jnp.sum(ref.apply(v, x) ** 2))(variables)
  assert grads["params"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(grads["params"]["kernel"], want["params"]["kernel"],
                             rtol=0.05, atol=0.05 * float(jnp.abs(want["params"]["kernel"]).max()))


def test_auto_implementations_per_platform():
  """conv_impl=auto: dot on CPU and GPU, xla on TPU; bn_backward=auto:
  recompute on CPU, autodiff elsewhere; explicit values stay; bad ones fail
  the start-up check."""
  from advsemiseg_jax.config import base_config
  from advsemiseg_jax.models import build_generator, resolve_bn_backward, resolve_conv_impl
  from advsemiseg_jax.validate import ConfigError, validate_config
  assert resolve_conv_impl("auto", "cpu") == resolve_conv_impl("auto", "gpu") == "dot"
  assert resolve_conv_impl("auto", "tpu") == "xla"
  assert resolve_conv_impl("xla", "cpu") == "xla" and resolve_conv_impl("dot", "tpu") == "dot"
  assert resolve_bn_backward("auto", "cpu") == "recompute"
  assert resolve_bn_backward("auto", "gpu") == resolve_bn_backward("auto", "tpu") == "autodiff"
  assert resolve_bn_backward("autodiff", "cpu") == "autodiff"
  config = base_config()
  assert config.model.conv_impl == config.model.bn_backward == "auto"
  model = build_generator(config.model, 3)
  assert model.conv_impl == resolve_conv_impl("auto")
  assert model.bn_backward == resolve_bn_backward("auto")
  for field, bad in (("conv_impl", "winograd"), ("bn_backward", "numeric")):
    config = base_config()
    config.model[field] = bad
    with pytest.raises(ConfigError, match=field):
      validate_config(config)


def _bottleneck_stack_gradient(blocks, batch=2, size=17, planes=16):
  """The compiled gradient of a stack of ``blocks`` training-mode
  bottlenecks (1x1 convs as GEMMs, the ``dot`` implementation)."""
  from advsemiseg_jax.models.deeplab import Bottleneck

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      norm = layers.batch_norm("batch_stats", train=True)
      for j in range(blocks):
        x = Bottleneck(planes, layers.conv_module("dot"), norm, dilation=2, name=f"b{j}")(x)
      return x

  x = jnp.ones((batch, size, size, 4 * planes))
  variables = Stack().init(jax.random.PRNGKey(0), x)

  def loss(params, x):
    y, _ = Stack().apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["params"], x).compile()


def _bottleneck_stack_temp_bytes(blocks, **kwargs):
  """XLA's planned temporaries for ``_bottleneck_stack_gradient``."""
  return _bottleneck_stack_gradient(blocks, **kwargs).memory_analysis().temp_size_in_bytes


def test_block_outputs_are_computed_once_not_in_each_user():
  """A block's output (BatchNorm + residual + ReLU) is written once and read
  by its users. XLA:CPU fused it into each user instead and, its residual
  being the previous block's output, recomputed the stage's whole chain of
  residual sums in each: HLO instructions (and the work of the elementwise
  fusions) grew with the square of the depth (per block, 1049 instructions
  from 4 to 8 blocks and 1277 from 8 to 16; now 841 and 841)."""
  def instructions(blocks):
    return hlo_instructions(_bottleneck_stack_gradient(blocks, planes=4))

  four, eight, sixteen = instructions(4), instructions(8), instructions(16)
  early, late = (eight - four) / 4, (sixteen - eight) / 8
  assert late <= 1.05 * early, (four, eight, sixteen)


def test_bottleneck_keeps_what_torch_keeps_for_the_backward_pass():
  """Per block, the backward pass needs the four 1x1/3x3 conv outputs' worth
  that torch keeps: conv1, relu1, conv2, relu2 (planes channels each), conv3
  and the block output (4 * planes each), 12 * planes channels per pixel.
  JAX's own derivative of BatchNorm + ReLU kept about twice that (see
  ``batch_norm_act``); XLA's plan must stay within 25% of it."""
  batch, size, planes = 2, 17, 16
  per_block = (_bottleneck_stack_temp_bytes(4) - _bottleneck_stack_temp_bytes(2)) / 2
  torch_keeps = 12 * planes * batch * size * size * 4
  assert per_block <= 1.25 * torch_keeps, per_block / torch_keeps


def _full_size_arrays_written(text, shape):
  """The entry computation's instructions, bitcasts and parameters aside,
  that produce an array of ``shape`` in a compiled function's HLO ``text``:
  what it writes out at full size."""
  entry = text[text.index("\nENTRY"):]
  target = "f32[" + ",".join(map(str, shape)) + "]"
  return [line.split("=")[0].strip() for line in entry.splitlines()
          if " = " in line and line.split(" = ")[1].startswith(target)
          and not any(f" {op}(" in line for op in ("bitcast", "parameter"))]


_BATCH_NORM_HLO = """
import json, sys
from advsemiseg_jax import parallel
parallel.set_default_xla_flags()
import jax, jax.numpy as jnp
from advsemiseg_jax.models import layers
shape = (2, 12, 12, 32)
kx, kr, kg = jax.random.split(jax.random.key(0), 3)
x, res, gy = (jax.random.normal(k, shape) for k in (kx, kr, kg))
scale, bias = jnp.ones(shape[-1:]), jnp.zeros(shape[-1:])
texts = {}
for residual in (False, True):
  def forward_backward(x, scale, bias, res, gy):
    out, vjp = jax.vjp(lambda *a: layers.batch_norm_act(*a, True, 1e-5)[0],
                       x, scale, bias, res if residual else None)
    return out, vjp(gy)
  texts[str(residual)] = jax.jit(forward_backward).lower(
      x, scale, bias, res, gy).compile().as_text()
json.dump(texts, sys.stdout)
"""


def test_batch_norm_backward_writes_x_minus_mean_once_and_no_xhat():
  """BatchNorm + ReLU forward and backward (``batch_norm_act``), compiled
  with the flags ``main.py`` sets (in a subprocess: XLA reads them when it
  starts), writes out five full-size arrays with or without a residual: the
  output, the ReLU's masked gradient, ``x - mean`` (read by the backward's
  reduction and by ``dx``), the input gradient and a broadcast zero. The
  textbook form, with ``xhat = (x - mean) * invstd`` shared by the reduction
  and ``dx``, wrote ``xhat`` as well: six. The map is large enough for XLA
  to give the elementwise work to YNNPACK, as in the model."""
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  out = subprocess.run([sys.executable, "-c", _BATCH_NORM_HLO], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  for residual, text in json.loads(out.stdout).items():
    written = _full_size_arrays_written(text, (2, 12, 12, 32))
    assert any("ynn_fusion" in name for name in written), written
    assert len(written) <= 5, (residual, written)


@pytest.mark.parametrize("shape", [(2, 9, 9, 3), (1, 10, 7, 5), (3, 8, 13, 4)])
def test_conv4x4_s2_input_gradient_is_xlas(shape):
  """``conv4x4_s2``'s input gradient (one stride-1 convolution into the
  input's four phases) equals the transpose of XLA's strided convolution, for
  odd, even and non-square maps."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 4, shape[-1], 6))
  y, vjp = jax.vjp(lambda x: layers.conv4x4_s2(x, kernel), x)
  dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  _, xla_vjp = jax.vjp(lambda x: layers._conv4x4_s2(x, kernel), x)
  got, want = jax.jit(vjp)(dy)[0], jax.jit(xla_vjp)(dy)[0]
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("size", [37, 40])
def test_discriminator_dot_matches_xla(size):
  """conv_impl=dot's D (kernel gradients as one GEMM per layer): same
  parameters, outputs and gradients as nn.Conv's, odd and even sizes."""
  from advsemiseg_jax.models import FCDiscriminator
  assert isinstance(layers.conv_module("dot")(4, (4, 4), strides=2, padding=((1, 1), (1, 1))),
                    layers.StridedConv4x4)
  x = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (3, size, size + 3, 5)) * 3)
  ref, dot = FCDiscriminator(width=4), FCDiscriminator(width=4, conv_impl="dot")
  variables = jax.jit(ref.init)(jax.random.PRNGKey(0), x)
  same = jax.jit(dot.init)(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(same)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(dot.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-6)
  got, want = _sin_loss_gradients(dot, variables, x), _sin_loss_gradients(ref, variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("shape,kernel,strides,padding,dilation", [
    ((2, 17, 14, 3), (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),    # The stem, odd and even.
    ((2, 16, 15, 4), (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((1, 12, 13, 2), (4, 3), (3, 2), ((0, 0), (1, 2)), (1, 1)),    # Strides that crop.
    ((2, 11, 9, 3), (3, 3), (2, 1), "SAME", (1, 2)),
])
def test_conv_nhwc_matches_lax_conv_and_stays_canonical_in_a_loop(shape, kernel, strides,
                                                                   padding, dilation):
  """``layers.Conv`` (``conv_nhwc``): nn.Conv's values and gradients, and on a
  CPU its gradients inside a ``lax.scan`` are NHWC/HWIO convolutions, which
  XLA:CPU runs on Eigen (JAX's own kernel gradient is ``f01b_i01o->01bf``,
  and XLA canonicalises layouts only outside loops)."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  args = dict(strides=strides, padding=padding, kernel_dilation=dilation)
  ref, ours = nn.Conv(5, kernel, **args), layers.Conv(5, kernel, **args)
  variables = ref.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  got, want = _sin_loss_gradients(ours, variables, x), _sin_loss_gradients(ref, variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))

  def looped(model):
    def body(carry, xi):
      return carry, jax.grad(lambda v, xi: jnp.sum(jnp.sin(model.apply(v, xi))),
                             argnums=(0, 1))(variables, xi)
    return jax.jit(lambda xs: jax.lax.scan(body, 0, xs)[1]).lower(jnp.stack([x, x]))

  labels = lambda text: {line.split("dim_labels=")[1].split(",")[0]
                         for line in text.splitlines() if " convolution(" in line}
  assert labels(looped(ours).compile().as_text()) == {"b01f_01io->b01f"}
  assert labels(looped(ref).compile().as_text()) != {"b01f_01io->b01f"}   # What it fixes.
