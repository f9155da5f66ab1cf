"""Layer pieces shared by the generator and the discriminator.

* ``resize_bilinear``: bilinear resizing with torch's ``align_corners=True``
  semantics, written as two small matrix products (fast on GPU/TPU, and
  differentiable without scatter ops).
* ``max_pool_ceil``: torch's ``MaxPool2d(..., ceil_mode=True)``.
* ``BatchNorm``/``batch_norm``: torch-equivalent BatchNorm and the factory for
  the two BN modes of the paper's code; ``batch_norm_act``, training-mode
  BatchNorm + residual + ReLU with a backward pass that keeps what torch's
  keeps.
* ``remat_call``: rematerialisation that XLA:CPU cannot undo.
* ``conv_module``/``summed_dilated_convs``: the convolution implementation
  switch (``model.conv_impl``). ``xla`` is ``lax.conv`` everywhere (fast on
  GPU/TPU), through ``Conv``/``conv_nhwc``, whose gradients on a CPU are
  convolutions in the layout XLA:CPU runs on Eigen also inside loops.
  ``dot`` writes 1x1 convolutions as ``dot_general`` over channels
  (``conv1x1``, whose backward pass chooses the operand to transpose), the
  ASPP head as one GEMM over only the taps that land inside the map, then
  shift-and-add, and computes the kernel gradient of the backbone's 3x3
  convolutions as one GEMM per tap (``dilated_conv3x3``): XLA:CPU runs all
  three several times faster that way (see docs/performance.md), and an
  H200 ran the VOC step 24% faster. D's 4x4 stride-2 convolutions get a
  GEMM kernel gradient too (``conv4x4_s2``). Same parameters, same results
  up to rounding.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advsemiseg_jax import ordering

# torch's BatchNorm momentum 0.1 updates ``running = 0.9 * running + 0.1 * batch``,
# which is Flax's momentum 0.9 (Flax's default 0.99 would be wrong here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
BN_MODES = ("batch_stats", "frozen")
BN_BACKWARDS = ("written", "autodiff", "recompute", "recompute_act")
RECOMPUTED = ("recompute", "recompute_act")   # BatchNorm.backward values with batch_norm_act_then.
CONV_IMPLS = ("xla", "dot")
_NHWC = ("NHWC", "HWIO", "NHWC")   # The convolutions' layout, and XLA:CPU's canonical one.


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) interpolation weights of 1-D linear resizing.

  Output sample ``i`` sits at input coordinate ``i * (in - 1) / (out - 1)``
  (torch's ``align_corners=True``); a size-1 output samples input 0.
  """
  if out_size == 1 or in_size == 1:
    src = np.zeros((out_size,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  mat = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, lo), 1.0 - frac)
  np.add.at(mat, (rows, hi), frac)
  return mat.astype(np.float32)


def resize_bilinear(x: jnp.ndarray, size) -> jnp.ndarray:
  """Resizes NHWC ``x`` to ``size=(height, width)``, align_corners=True."""
  out_h, out_w = int(size[0]), int(size[1])
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  mh = jnp.asarray(align_corners_matrix(out_h, in_h), x.dtype)
  mw = jnp.asarray(align_corners_matrix(out_w, in_w), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x)
  return jnp.einsum("pw,nowc->nopc", mw, x)


def ceil_pool_padding(size: int, window: int, stride: int, pad: int):
  """(low, high) padding that makes a VALID pool equal torch's ceil_mode pool."""
  out = -(-(size + 2 * pad - window) // stride) + 1
  # torch drops a last window that would start inside the right padding only.
  if (out - 1) * stride >= size + pad:
    out -= 1
  high = (out - 1) * stride + window - size - pad
  return pad, max(high, 0)


def max_pool_ceil(x: jnp.ndarray, window: int = 3, stride: int = 2, pad: int = 1):
  """torch ``MaxPool2d(window, stride, padding=pad, ceil_mode=True)`` on NHWC."""
  ph = ceil_pool_padding(x.shape[1], window, stride, pad)
  pw = ceil_pool_padding(x.shape[2], window, stride, pad)
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=(ph, pw))


def _batch_stats(x):
  """Per-channel mean and biased variance of NHWC ``x`` in float32, as
  ``E[x^2] - E[x]^2`` clamped at 0, and where that raw variance is > 0."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(0, 1, 2))
  raw_var = jnp.mean(jnp.square(xf), axis=(0, 1, 2)) - jnp.square(mean)
  return mean, jnp.maximum(raw_var, 0.0), raw_var > 0


def _normalize_act(x, mean, var, scale, bias, residual, relu, epsilon):
  """``relu(scale * (x - mean) / sqrt(var + eps) + bias + residual)`` (the
  residual and the ReLU optional) in ``x``'s dtype, statistics in float32."""
  mul = scale * lax.rsqrt(var + epsilon)
  y = x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype)
  if residual is not None:
    y = y + residual.astype(y.dtype)
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_act(x, scale, bias, residual, relu: bool, epsilon: float):
  """Training-mode BatchNorm of NHWC ``x`` with its batch statistics, then
  ``+ residual`` (or ``None``) and a ReLU if ``relu``, as one differentiable
  op. Returns ``(y, mean, var)``: the batch mean and biased variance, for the
  running averages.

  The backward pass is written out so that it keeps only ``x`` and, with the
  ReLU, the output ``y`` (which the next convolution keeps anyway), as
  torch's BatchNorm and in-place ReLU do. JAX's own derivative of the same
  formula, as XLA:CPU plans it, keeps four full-size tensors per BatchNorm
  (``x``, a broadcast of ``scale * invstd``, the pre-ReLU sum and ``y``):
  twice the activation memory of a bottleneck. Same values up to rounding;
  gradients that reach ``mean`` or ``var`` are included.
  """
  outputs, _ = _batch_norm_act_fwd(x, scale, bias, residual, relu, epsilon)
  return outputs


def _batch_norm_act_fwd(x, scale, bias, residual, relu, epsilon):
  mean, var, var_used = _batch_stats(x)
  y = _normalize_act(x, mean, var, scale, bias, residual, relu, epsilon)
  if residual is not None:
    # A block's output, written once. As a sum of elementwise ops, XLA:CPU
    # fuses it into each of its users and, the residual being the previous
    # block's output, recomputes the whole chain of residual sums back to
    # the stage's first block in each: quadratic in a stage's depth (a
    # ResNet-101 step at 161x161 had 109,000 HLO instructions, 91,000 with
    # this copy). XLA does not fuse through a gather: copied_after's copy
    # (rows gathered with indices that depend on ``mean``, already computed)
    # is read by every user instead.
    y = ordering.copied_after(y, mean)
  residual_like = None if residual is None else jnp.zeros((), residual.dtype)
  return (y, mean, var), (x, y if relu else None, scale, mean, var, var_used, residual_like)


def _batch_norm_act_bwd(relu, epsilon, saved, cotangents):
  gy, gmean, gvar = cotangents
  x, y, scale, mean, var, var_used, residual_like = saved
  # The per-channel values, and the ReLU's threshold, are read through a
  # dependency on gy, so that nothing computed from them can be shared with
  # the forward pass or moved into it: otherwise XLA shares the forward's
  # full-size broadcast of scale * invstd and its pre-ReLU sum (it rewrites
  # ``y > 0`` as ``sum > 0``), and keeps both alive until here. Tying these
  # scalars and vectors, not x and y themselves, costs no full-size copy.
  tie = lambda t: ordering.computed_after(t, gy)
  scale, mean, var = map(tie, (scale, mean, var))
  gs = gy.astype(jnp.float32)
  if relu:
    gs = jnp.where(y > tie(jnp.zeros((), y.dtype)), gs, 0.0)
  n = x.size // x.shape[-1]
  invstd = lax.rsqrt(var + epsilon)
  xf = x.astype(jnp.float32)
  gbias = jnp.sum(gs, axis=(0, 1, 2))
  gscale = jnp.sum(gs * (xf - mean), axis=(0, 1, 2)) * invstd
  # d/dx of scale * (x - mean) * rsqrt(var + eps) + bias, mean and var being
  # the batch statistics (the variance terms drop where the clamp was
  # active), as per-channel k1 * gs + k2 * (x - mean) + k3. XLA:CPU writes
  # ``x - mean`` out once, for the reduction and ``dx`` to read; the textbook
  # form's ``xhat = (x - mean) * invstd``, used by both, was written out as
  # well (6 full-size arrays -> 5 under the flags main.py sets). Tying the
  # second ``x - mean`` to gscale (ordering.computed_after), so that each
  # pass computes its own, wrote 4, but under XLA's default flags the
  # bottleneck kept 1.6x what it keeps this way; A/B at 161x161, full step,
  # Xeon: this form 2.65 s against the textbook 2.74 s (torch 2.66 s).
  var_term = jnp.where(var_used, gscale / n, 0.0)
  k1 = scale * invstd
  k2 = jnp.where(var_used, gvar, 0.0) * (2.0 / n) - k1 * invstd * var_term
  k3 = gmean / n - k1 * gbias / n
  dx = k1 * gs + k2 * (xf - mean) + k3
  gres = None if residual_like is None else gs.astype(residual_like.dtype)
  return dx.astype(x.dtype), gscale, gbias, gres


batch_norm_act.defvjp(_batch_norm_act_fwd, _batch_norm_act_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def batch_norm_act_then(then, x, scale, bias, then_params, epsilon, norm2=None):
  """``then(then_params, relu(BatchNorm(x)))`` and the batch ``mean`` and
  ``var``, as ``batch_norm_act`` followed by ``then`` (a convolution), but
  keeping only ``x`` for the backward pass: the activation, which ``then``
  would keep as its input, is recomputed from ``x`` and the statistics once
  the output's gradient exists (``model.bn_backward=recompute``). Torch's
  BatchNorm and in-place ReLU keep both tensors. Same values up to rounding.

  With ``norm2 = (scale2, bias2, residual)``, ``then``'s output goes on
  through ``batch_norm_act(., scale2, bias2, residual, relu=True)`` (a
  bottleneck's last BatchNorm), whose input is not kept either: it is
  ``then``'s output, recomputed in the backward pass as well. Returns
  ``(y, mean, var, mean2, var2)`` then.
  """
  outputs, _ = _batch_norm_act_then_fwd(then, x, scale, bias, then_params, epsilon, norm2)
  return outputs


def _batch_norm_act_then_fwd(then, x, scale, bias, then_params, epsilon, norm2):
  (y, mean, var), (_, _, _, _, _, var_used, _) = _batch_norm_act_fwd(
      x, scale, bias, None, True, epsilon)
  # Written out, as the written backward's kept activation is: fused into
  # its only user, a 3x3 convolution became a YNNPACK convolution on XLA:CPU
  # (66 per 161 step, 0.6 s of op time against 0.1-0.2 for XLA's own). XLA
  # drops optimization barriers before fusing; it does not fuse through a
  # gather (``ordering.copied_after``).
  y = ordering.copied_after(y, mean)
  z = then(then_params, y)
  saved = (x, scale, bias, mean, var, var_used, then_params)
  if norm2 is None:
    return (z, mean, var), (saved, None)
  scale2, bias2, residual = norm2
  (out, mean2, var2), (_, _, _, _, _, var_used2, residual_like) = _batch_norm_act_fwd(
      z, scale2, bias2, residual, True, epsilon)
  return (out, mean, var, mean2, var2), (saved, (out, scale2, mean2, var2, var_used2,
                                                 residual_like))


def _batch_norm_act_then_bwd(then, epsilon, saved, cotangents):
  (x, scale, bias, mean, var, var_used, then_params), saved2 = saved
  g, gmean, gvar = cotangents[:3]
  # Tied to g, so that XLA neither computes the activation again inside the
  # forward pass nor shares it with the forward pass's (which then lives on).
  tscale, tbias, tmean, tvar = (ordering.computed_after(t, g) for t in (scale, bias, mean, var))
  y = _normalize_act(x, tmean, tvar, tscale, tbias, None, False, epsilon)
  # The ReLU's zero tied too: XLA:CPU writes a constant zero out as a
  # full-size array for its YNNPACK fusions and shares it with the forward
  # pass's, which then lives through the whole backward pass.
  y = jnp.maximum(y, ordering.computed_after(jnp.zeros((), y.dtype), g))
  z, pull = jax.vjp(then, then_params, y)
  gnorm2 = None
  if saved2 is not None:
    out, scale2, mean2, var2, var_used2, residual_like = saved2
    g, gscale2, gbias2, gres = _batch_norm_act_bwd(
        True, epsilon, (z, out, scale2, mean2, var2, var_used2, residual_like),
        (g, *cotangents[3:]))
    gnorm2 = (gscale2, gbias2, gres)
  gparams, gy = pull(g)
  gx, gscale, gbias, _ = _batch_norm_act_bwd(
      True, epsilon, (x, y, scale, mean, var, var_used, None), (gy, gmean, gvar))
  return gx, gscale, gbias, gparams, gnorm2


batch_norm_act_then.defvjp(_batch_norm_act_then_fwd, _batch_norm_act_then_bwd)


def batch_norm_act_autodiff(x, scale, bias, residual, relu: bool, epsilon: float):
  """``batch_norm_act``'s formula and outputs, differentiated by JAX
  (``model.bn_backward=autodiff``). XLA:GPU runs its derivative faster than
  the written-out one (see docs/performance.md); XLA:CPU keeps twice the
  activations with it."""
  mean, var, _ = _batch_stats(x)
  return _normalize_act(x, mean, var, scale, bias, residual, relu, epsilon), mean, var


class BatchNorm(nn.Module):
  """torch-equivalent BatchNorm over NHWC (statistics over N, H, W).

  Normalises with the biased batch variance (or the running averages) and,
  like torch, updates the running variance with the UNBIASED batch variance:
  ``running = momentum * running + (1 - momentum) * batch``. Variables are
  named like Flax's: params ``scale``/``bias``, batch_stats ``mean``/``var``.

  ``__call__(x, residual=None, relu=False, then=None)`` also adds
  ``residual`` and applies a ReLU after the normalisation, then ``then`` (a
  convolution module, or a ``ThenNorm``: a convolution and the next
  BatchNorm) if given, and returns its output; with batch statistics all
  three are one ``batch_norm_act``, whose backward pass keeps what torch's
  keeps (``backward="written"``), or ``batch_norm_act_autodiff``
  (``"autodiff"``). With ``"recompute"``, a ReLU output that feeds ``then``
  is not kept, nor is the input of a ``ThenNorm``'s BatchNorm:
  ``batch_norm_act_then`` recomputes them in the backward pass.
  ``"recompute_act"`` recomputes the ReLU output only and keeps the
  ``ThenNorm``'s BatchNorm input (a bottleneck's conv3 output), so that no
  convolution runs twice.
  """
  use_running_average: bool = False
  backward: str = "written"
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual=None, relu: bool = False, then=None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if then is None:
      then = lambda y: y   # noqa: E731
    if self.use_running_average:
      return then(_normalize_act(x, ra_mean.value, ra_var.value, scale, bias, residual,
                                 relu, self.epsilon))
    if self.backward not in BN_BACKWARDS:
      raise ValueError(f"model.bn_backward must be one of {BN_BACKWARDS}, got {self.backward!r}")
    if (self.backward in RECOMPUTED and isinstance(then, (nn.Module, ThenNorm)) and relu
        and residual is None and not self.is_initializing()):
      y, mean, var = self._recomputed_then(x, scale, bias, then)
    else:
      fn = batch_norm_act_autodiff if self.backward == "autodiff" else batch_norm_act
      y, mean, var = fn(x, scale, bias, residual, relu, self.epsilon)
      y = then(y)
    if not self.is_initializing():
      self.record(mean, var, x.size // c)
    return y

  def _recomputed_then(self, x, scale, bias, then):
    """``then(relu(self(x)))`` through ``batch_norm_act_then``, a
    ``ThenNorm``'s BatchNorm included when it normalises with batch
    statistics and ``backward`` is ``recompute`` (its running averages
    updated here); else that BatchNorm follows as a module of its own."""
    conv = then.conv if isinstance(then, ThenNorm) else then
    apply = conv.clone(parent=None).apply
    norm2 = None
    if (isinstance(then, ThenNorm) and not then.norm.use_running_average
        and self.backward == "recompute"):
      params = then.norm.variables["params"]
      norm2 = (params["scale"], params["bias"], then.residual)
    out = batch_norm_act_then(lambda p, y: apply({"params": p}, y), x, scale, bias,
                              conv.variables["params"], self.epsilon, norm2)
    y = out[0]
    if norm2 is not None:
      then.norm.record(*out[3:], y.size // y.shape[-1])
    elif isinstance(then, ThenNorm):
      y = then.norm(y, residual=then.residual, relu=True)
    return (y, *out[1:3])

  def record(self, mean, var, n: int):
    """Moves the running averages towards a batch's ``mean`` and biased
    ``var`` over ``n`` values per channel, updating the variance with the
    unbiased ``var * n / (n - 1)`` as torch does."""
    m = self.momentum
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    for name, value in (("mean", mean), ("var", var * (n / max(n - 1, 1)))):
      self.put_variable("batch_stats", name,
                        m * self.get_variable("batch_stats", name) + (1 - m) * value)


@dataclasses.dataclass(frozen=True)
class ThenNorm:
  """``norm(conv(y), residual=residual, relu=True)``, as a ``BatchNorm``'s
  ``then``: a bottleneck's last convolution and BatchNorm. With
  ``bn_backward=recompute`` neither ``y`` nor ``conv``'s output is kept for
  the backward pass (``batch_norm_act_then`` with ``norm2``); with
  ``recompute_act``, ``y`` is not."""
  conv: nn.Module
  norm: nn.Module
  residual: Any

  def __call__(self, y):
    return self.norm(self.conv(y), residual=self.residual, relu=True)


def remat_call(module: nn.Module, x):
  """``module(x)``, keeping only ``x`` and the module's variables for the
  backward pass, which recomputes ``module(x)`` once the gradient of its
  output exists (``model.remat_stages`` applies it to each block).

  Unlike ``nn.remat``, the recomputation is tied to that gradient by a data
  dependency: XLA:CPU removes ``jax.checkpoint``'s optimization barriers and
  schedules its recomputation inside the forward pass, where it saves
  nothing. Mutable collections (BatchNorm statistics) update in the forward
  pass only; the recomputation reads the values the forward pass read.
  """
  unbound = module.clone(parent=None)

  def call(mdl, x):
    return mdl(x)

  def forward(mdl, x):
    variables = dict(mdl.variables)   # as they were before this call
    return mdl(x), (variables, x)

  def backward(saved, gy):
    variables, x = saved
    x = ordering.computed_after(x, gy)

    def recompute(params, x):
      return unbound.apply({**variables, "params": params}, x, mutable=True)[0]

    _, vjp = jax.vjp(recompute, variables["params"], x)
    grad_params, grad_x = vjp(gy)
    others = {k: jax.tree.map(jnp.zeros_like, v) for k, v in variables.items() if k != "params"}
    return {**others, "params": grad_params}, grad_x

  # Every collection enters as an argument (grad_vars=True): closed over, the
  # statistics that an earlier pass updated leak out of the trace.
  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward,
                       grad_vars=True)(module, x)


def batch_norm(bn_mode: str, train: bool, dtype=jnp.float32, backward: str = "written"):
  """BatchNorm as the authors' code runs it.

  ``batch_stats``: batch statistics while training (running averages updated
  with torch's momentum), running averages at evaluation.
  ``frozen``: running averages always. In both modes the affine parameters are
  frozen by the optimiser rules, not here. ``backward``: how the training-mode
  BatchNorm is differentiated (``BN_BACKWARDS``; same values).
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f"model.bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
  use_running = (not train) or bn_mode == "frozen"
  return functools.partial(BatchNorm, use_running_average=use_running, dtype=dtype,
                           backward=backward)


class _ConvAsGemm(nn.Module):
  """``nn.Conv``'s fields and parameters (``kernel`` (kh, kw, in, out),
  optional ``bias``), so checkpoints move freely between the two; subclasses
  compute the convolution in ``convolve`` (inputs already in ``dtype``)."""
  features: int
  kernel_size: Any = (1, 1)
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  def convolve(self, x, kernel):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
    y = self.convolve(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


class DotConv(_ConvAsGemm):
  """A 1x1 convolution (no padding) as a matrix product over channels. A
  stride ``s`` samples every ``s``-th pixel first, as a 1x1 convolution does."""
  strides: Any = 1

  def convolve(self, x, kernel):
    if tuple(self.kernel_size) != (1, 1):
      raise ValueError(f"DotConv is 1x1 only, got kernel_size={self.kernel_size}")
    s = self.strides if isinstance(self.strides, int) else self.strides[0]
    if s > 1:
      x = x[:, ::s, ::s, :]
    return conv1x1(x, kernel[0, 0])


def kernel_gradients(x, dys):
  """``[x^T dy for dy in dys]`` in float32, for a (pixels, cin) ``x`` and
  (pixels, cout) output gradients ``dys``: the kernel gradients of products
  over channels.

  XLA:CPU runs a product whose operands both contract over their leading
  dimension on Eigen, at 1.2-1.9x torch's time for ResNet's 1x1 shapes:
  YNNPACK takes only a left operand whose contracting dimension is last,
  and XLA folds any transpose into the product's dimension numbers. So on a
  CPU one operand is transposed and written out, behind optimization
  barriers that keep XLA from folding it back:

  * one product whose output gradient is at most as wide as ``x``:
    ``(dy^T x)^T``, ``dy^T`` written out (it exists in the backward pass
    only) and the small product transposed back;
  * otherwise ``x^T``, written out once for all the products (a 3x3
    kernel's nine taps), from a copy of ``x`` that depends on ``dys``
    (``ordering.computed_after``): written from ``x`` itself, XLA made
    every layer's during the forward pass and kept it (0.1 GiB more at
    161x161).

  Alone, against torch's ``x.T @ dy`` (2 cores, ms): 882x1024x256 2.6
  (Eigen 3.6, torch 2.5); 13778x256x64 3.3 (5.2, 2.8); a layer3 3x3
  kernel's nine taps at 21x21 5.8 against 7.0. Elsewhere it is one
  ``dot_general`` each: cuBLAS and TPUs take either layout.

  D's 4x4 kernel gradients (``conv4x4_s2``) stay plain products: with
  ``dy^T`` written out, two of D's layers ran faster alone (3362x1024x128:
  9.6 -> 5.4 ms) but XLA planned 35 MiB more for the 161x161 step.
  """
  return lax.platform_dependent(x, dys, cpu=_kernel_gradients_cpu,
                                default=_kernel_gradients_tn)


def _tn(x, dy):
  return lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _kernel_gradients_tn(x, dys):
  return [_tn(x, dy) for dy in dys]


def _kernel_gradients_cpu(x, dys):
  written = lax.optimization_barrier
  if len(dys) == 1 and dys[0].shape[1] <= x.shape[1]:
    dyt = written(jnp.transpose(dys[0]))
    return [jnp.transpose(written(jnp.matmul(dyt, x, preferred_element_type=jnp.float32)))]
  xt = written(jnp.transpose(written(ordering.computed_after(x, dys[0]))))
  return [jnp.matmul(xt, dy, preferred_element_type=jnp.float32) for dy in dys]


@jax.custom_vjp
def conv1x1(x, kernel):
  """NHWC ``x`` times a (cin, cout) ``kernel`` over channels, whose backward
  pass computes the kernel gradient with ``kernel_gradients`` (and
  transposes the kernel for the input gradient). JAX's derivative leaves
  the layout to XLA:CPU, which transposed the output gradient, often the
  larger, in 182 places of the 321 step: 1.07 s of op time, and the step
  took 4.5% longer. Same values up to rounding."""
  return lax.dot_general(x, kernel, (((3,), (0,)), ((), ())))


def _conv1x1_fwd(x, kernel):
  return conv1x1(x, kernel), (x, kernel)


def _conv1x1_bwd(residuals, dy):
  x, kernel = residuals
  dx = dy @ jnp.transpose(kernel)
  [dkernel] = kernel_gradients(x.reshape(-1, x.shape[-1]), [dy.reshape(-1, dy.shape[-1])])
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv1x1.defvjp(_conv1x1_fwd, _conv1x1_bwd)


def tap_offsets(dilation: int, h: int, w: int):
  """``((ky, kx), (oy, ox), inside)`` for the nine taps of a 3x3 kernel with
  this dilation, in kernel order: output pixel ``p`` reads input ``p + (oy,
  ox)``, ``(oy, ox) = ((ky - 1) d, (kx - 1) d)``. A tap whose offset is at
  least the (h, w) map's size only ever reads zero padding (not ``inside``)."""
  d = dilation
  return [((ky, kx), ((ky - 1) * d, (kx - 1) * d),
           abs(ky - 1) * d < h and abs(kx - 1) * d < w)
          for ky in range(3) for kx in range(3)]


def _dilated_conv3x3(x, kernel, dilation: int):
  d = dilation
  return lax.conv_general_dilated(x, kernel, (1, 1), ((d, d), (d, d)),
                                  rhs_dilation=(d, d),
                                  dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dilated_conv3x3(x, kernel, dilation: int):
  """A stride-1 3x3 convolution with dilation ``d`` and padding ``d`` (the
  output has the input's size), NHWC/HWIO, with a backward pass written for
  XLA:CPU: the input gradient is the forward convolution of the output
  gradient with the flipped, transposed kernel, and the kernel gradient is
  one matrix product per tap, ``shifted(dy)^T @ x`` over all pixels
  (XLA:CPU's own kernel-gradient convolution runs a few times slower than
  that GEMM on 41x41 and larger maps). Same values up to rounding."""
  return _dilated_conv3x3(x, kernel, dilation)


def _dilated_conv3x3_fwd(x, kernel, dilation):
  return _dilated_conv3x3(x, kernel, dilation), (x, kernel)


def _dilated_conv3x3_bwd(dilation, residuals, dy):
  x, kernel = residuals
  d = dilation
  n, h, w, cin = x.shape
  cout = dy.shape[-1]
  # The flipped kernel is made from a copy taken after dy: otherwise XLA makes
  # it at the start of the step and keeps it (all 3x3 kernels' worth) to the end.
  flipped = jnp.flip(ordering.copied_after(kernel, dy), (0, 1)).swapaxes(2, 3)
  dx = _dilated_conv3x3(dy, flipped, d)
  # Tap (ky, kx) reads x at p + o, o = ((ky - 1) d, (kx - 1) d), so its
  # gradient is sum_q dy[q - o] x[q]: shift dy, not x, so that every copy
  # made here depends on dy and lives in the backward pass only.
  padded = jnp.pad(dy, ((0, 0), (d, d), (d, d), (0, 0)))
  offsets = tap_offsets(d, h, w)
  # Each tap's gradient as x^T dy, (cin, cout): the kernel's own layout, so
  # no transpose follows (dy^T x cost 99 transposes per 161 step).
  shifted = [padded[:, d - oy:d - oy + h, d - ox:d - ox + w, :].reshape(n * h * w, cout)
             for _, (oy, ox), inside in offsets if inside]
  grads = iter(kernel_gradients(x.reshape(n * h * w, cin), shifted))
  taps = [next(grads) if inside else jnp.zeros((cin, cout), jnp.float32)
          for _, _, inside in offsets]
  dkernel = jnp.stack(taps).reshape(3, 3, cin, cout)
  return dx, dkernel.astype(kernel.dtype)


dilated_conv3x3.defvjp(_dilated_conv3x3_fwd, _dilated_conv3x3_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """``lax.conv_general_dilated``, for ``nn.Conv(conv_general_dilated=...)``
  (``Conv``): a 2-D NHWC/HWIO convolution without input dilation or groups
  goes through ``conv_nhwc``, whose gradients on a CPU are convolutions in
  XLA:CPU's canonical layout; anything else goes to lax as it is."""
  n = lhs.ndim - 2
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) if lhs.ndim == 4 else None
  if (nhwc is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc
      or tuple(lhs_dilation or (1,) * n) != (1,) * n or feature_group_count != 1
      or batch_group_count != 1 or preferred_element_type is not None):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  dilation = tuple(rhs_dilation or (1,) * n)
  if isinstance(padding, str):
    reach = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], reach, window_strides, padding)
  return conv_nhwc(lhs, rhs, tuple(window_strides),
                   tuple(tuple(int(v) for v in p) for p in padding), dilation, precision)


def Conv(features, kernel_size, **kwargs) -> nn.Conv:
  """``nn.Conv`` (same fields, parameters and values) computing through
  ``conv_general_dilated``."""
  return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


def _conv_nhwc(x, kernel, strides, padding, dilation, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_nhwc(x, kernel, strides, padding, dilation, precision=None):
  """A 2-D NHWC/HWIO convolution (``strides``, explicit ``padding`` pairs,
  kernel ``dilation``) whose gradients, on a CPU, are themselves NHWC/HWIO
  convolutions of transposed operands.

  JAX's derivative of a convolution is a convolution with permuted
  dimension numbers (the kernel gradient's is ``f01b_i01o->01bf``). XLA:CPU
  hands a convolution to Eigen only in that canonical layout, and brings
  other layouts to it (``ConvCanonicalization``) only in the program's
  entry computation: inside a loop (``lax.scan``: ``optim.iter_size``, the
  sequential passes) it emits them as plain loops, and the stem's kernel
  gradient took 408 ms of a 4.0 s ResNet-101 step at 161x161, against
  a few ms canonical. Written here with the same transposes that
  canonicalisation adds, they run on Eigen everywhere. Elsewhere: JAX's own
  derivative (cuDNN and TPUs take any layout)."""
  return _conv_nhwc(x, kernel, strides, padding, dilation, precision)


def _conv_nhwc_fwd(x, kernel, strides, padding, dilation, precision):
  return _conv_nhwc(x, kernel, strides, padding, dilation, precision), (x, kernel)


def _conv_nhwc_bwd(strides, padding, dilation, precision, residuals, dy):
  x, kernel = residuals

  def jax_rule(x, kernel, dy):
    _, vjp = jax.vjp(lambda a, b: _conv_nhwc(a, b, strides, padding, dilation, precision),
                     x, kernel)
    return vjp(dy)

  def canonical(x, kernel, dy):
    sizes, ksizes, out_sizes = x.shape[1:3], kernel.shape[:2], dy.shape[1:3]
    # Input gradient: dy, dilated by the strides, convolved with the flipped
    # kernel (in and out swapped), made after dy as in ``dilated_conv3x3``.
    flipped = jnp.flip(ordering.copied_after(kernel, dy), (0, 1)).swapaxes(2, 3)
    reach = [(k - 1) * d + 1 for k, d in zip(ksizes, dilation)]
    dx_pads = [(r - 1 - lo, n - 1 - (p - 1) * s + lo)
               for r, (lo, _), n, p, s in zip(reach, padding, sizes, out_sizes, strides)]
    dx = lax.conv_general_dilated(dy, flipped, (1, 1), dx_pads, lhs_dilation=strides,
                                  rhs_dilation=dilation, dimension_numbers=_NHWC,
                                  precision=precision)
    # Kernel gradient: batch and channels swap roles, x^T (cin, h, w, batch)
    # convolved with dy^T (h', w', batch, cout) dilated by the strides.
    dk_pads = [(lo, r + (p - 1) * s - n - lo)
               for r, (lo, _), n, p, s in zip(reach, padding, sizes, out_sizes, strides)]
    dk = lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)),
                                  jnp.transpose(dy, (1, 2, 0, 3)), dilation, dk_pads,
                                  rhs_dilation=strides, dimension_numbers=_NHWC,
                                  precision=precision)
    return dx.astype(x.dtype), jnp.transpose(dk, (1, 2, 0, 3)).astype(kernel.dtype)

  return tuple(lax.platform_dependent(x, kernel, dy, cpu=canonical, default=jax_rule))


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _conv4x4_s2(x, kernel):
  return lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def conv4x4_s2(x, kernel):
  """D's convolution: 4x4, stride 2, padding 1, NHWC/HWIO, whose kernel
  gradient is one GEMM over all 16 taps (the input's 4x4 patches at the
  output's positions against the output gradient): on XLA:CPU 1.2-2.6x
  faster than XLA's own kernel-gradient convolution for D's first three
  layers at 161x161 and 321x321 inputs. The input gradient is one stride-1
  convolution into the input's four phases (``_conv4x4_s2_input_gradient``).
  Same values up to rounding."""
  return _conv4x4_s2(x, kernel)


def _conv4x4_s2_fwd(x, kernel):
  return _conv4x4_s2(x, kernel), (x, kernel)


def _conv4x4_s2_input_gradient(dy, kernel, x_shape):
  """The input gradient of ``_conv4x4_s2`` as one stride-1 2x2 convolution
  of ``dy`` (padded by one) into the four phases of the padded input.

  Padded input row ``q = 2o + k`` gets ``dy[o] K[k]^T``: an even ``q = 2m``
  from taps 0 and 2 (``o = m`` and ``m - 1``), an odd ``q = 2m + 1`` from
  taps 1 and 3. So phase ``(a, b)`` at ``m`` is a 2x2 correlation of ``dy``
  with ``K[a + 2 (1 - t)]`` at offset ``t``; the four phases are the output
  channels of one convolution, interleaved (depth to space) and cropped to
  the input. XLA's own transposed convolution (an input-dilated one) ran up
  to 4.4x slower on XLA:CPU for D's layers (78.9 against 17.9 ms for the
  first layer's at 321x321, batch 2; about even for the fourth's). Same
  values up to rounding."""
  n, h, w, cin = x_shape
  _, ho, wo, cout = dy.shape
  # kernel[2 oy + a, 2 ox + b, ci, co] -> w2[1 - oy, 1 - ox, co, (a, b, ci)]
  w2 = kernel.reshape(2, 2, 2, 2, cin, cout)[::-1, :, ::-1]
  w2 = w2.transpose(0, 2, 5, 1, 3, 4).reshape(2, 2, cout, 4 * cin)
  phases = lax.conv_general_dilated(
      jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0))), w2, (1, 1), "VALID",
      dimension_numbers=_NHWC)
  padded = phases.reshape(n, ho + 1, wo + 1, 2, 2, cin).transpose(0, 1, 3, 2, 4, 5)
  padded = padded.reshape(n, 2 * ho + 2, 2 * wo + 2, cin)
  return padded[:, 1:1 + h, 1:1 + w, :]


def _conv4x4_s2_bwd(residuals, dy):
  x, kernel = residuals
  # The kernel is read through a copy taken after dy (as in
  # ``_dilated_conv3x3_bwd``), so that its rearranged copy is made here.
  dx = _conv4x4_s2_input_gradient(dy, ordering.copied_after(kernel, dy), x.shape)
  dx = dx.astype(x.dtype)
  _, ho, wo, cout = dy.shape
  # Tap (ky, kx) of output pixel p reads padded x at 2p + (ky, kx). Read x
  # through dy so that the patches live in the backward pass only.
  xp = jnp.pad(ordering.computed_after(x, dy), ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.stack([xp[:, ky:ky + 2 * ho - 1:2, kx:kx + 2 * wo - 1:2, :]
                       for ky in range(4) for kx in range(4)], axis=3)
  # One plain product (see ``kernel_gradients``).
  dkernel = _tn(patches.reshape(-1, 16 * x.shape[-1]), dy.reshape(-1, cout))
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


conv4x4_s2.defvjp(_conv4x4_s2_fwd, _conv4x4_s2_bwd)


class StridedConv4x4(_ConvAsGemm):
  """``nn.Conv(features, (4, 4), strides=2, padding=1)`` through
  ``conv4x4_s2``: same parameter names, shapes and initialisers."""
  kernel_size: Any = (4, 4)

  def convolve(self, x, kernel):
    return conv4x4_s2(x, kernel)


class Conv3x3(_ConvAsGemm):
  """``nn.Conv(features, (3, 3), padding=d, kernel_dilation=d)`` through
  ``dilated_conv3x3``: same parameter names, shapes and initialisers."""
  kernel_size: Any = (3, 3)
  dilation: int = 1

  def convolve(self, x, kernel):
    return dilated_conv3x3(x, kernel, self.dilation)


def conv_module(impl: str) -> Callable[..., nn.Module]:
  """The convolution class for ``model.conv_impl``: ``nn.Conv`` (``xla``), or
  a factory (``dot``) that builds ``DotConv`` for 1x1 kernels, ``Conv3x3``
  for stride-1 3x3 kernels padded by their dilation, ``StridedConv4x4`` for
  D's stride-2 4x4 kernels padded by 1, and ``nn.Conv`` for every other
  kernel. All take ``nn.Conv``'s arguments."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "xla":
    return Conv

  def make(features, kernel_size, strides=1, padding="SAME", **kwargs):
    unpadded = padding in ("SAME", "VALID", 0, ((0, 0), (0, 0)))
    if tuple(kernel_size) == (1, 1) and unpadded and kwargs.get("kernel_dilation", 1) == 1:
      kwargs.pop("kernel_dilation", None)
      return DotConv(features, kernel_size=kernel_size, strides=strides, **kwargs)
    d = kwargs.get("kernel_dilation", 1)
    if (isinstance(d, int) and tuple(kernel_size) == (3, 3) and strides in (1, (1, 1))
        and padding in (d, ((d, d), (d, d)))):
      kwargs.pop("kernel_dilation", None)
      return Conv3x3(features, dilation=d, **kwargs)
    if (d == 1 and tuple(kernel_size) == (4, 4) and strides in (2, (2, 2))
        and padding in (1, ((1, 1), (1, 1)))):
      kwargs.pop("kernel_dilation", None)
      return StridedConv4x4(features, **kwargs)
    return Conv(features, kernel_size, strides=strides, padding=padding, **kwargs)
  return make


def summed_dilated_convs(x, kernels, biases, dilations, dtype=jnp.float32):
  """``sum_i conv(x, kernels[i], dilation=dilations[i], padding=dilation) + b_i``
  for 3x3 kernels, as one GEMM and shifts.

  Output pixel ``p`` of a 3x3 convolution with dilation ``d`` reads input
  ``p + ((ky - 1) d, (kx - 1) d)``. Taps whose offset is at least the map
  size only ever read zero padding and are dropped; taps with the same
  offset (the centre tap of every branch) are merged by adding their
  kernels. The remaining taps' kernels are concatenated into one
  (in, taps * out) matrix; each tap's slice of the product is then shifted
  into place (zero-filled) and summed.
  """
  n, h, w, cin = x.shape
  taps = {}
  for kernel, d in zip(kernels, dilations):
    for tap, off, inside in tap_offsets(d, h, w):
      if inside:
        taps[off] = taps[off] + kernel[tap] if off in taps else kernel[tap]
  offsets = list(taps)
  cout = kernels[0].shape[-1]
  mat = jnp.concatenate([taps[o] for o in offsets], axis=1).astype(dtype)
  y = conv1x1(x.astype(dtype), mat)
  out = shifted_sum(y.reshape(n, h, w, len(offsets), cout), tuple(offsets))
  return out + sum(biases).astype(dtype)


def _reach(offsets):
  """(rows, columns): the largest offset each way, the padding a shift needs."""
  return tuple(max(abs(o[i]) for o in offsets) for i in (0, 1))


def _shifted_sum(y, offsets):
  n, h, w = y.shape[:3]
  ph, pw = _reach(offsets)
  y = jnp.pad(y, ((0, 0), (ph, ph), (pw, pw), (0, 0), (0, 0)))
  return sum(y[:, ph + dy:ph + dy + h, pw + dx:pw + dx + w, t]
             for t, (dy, dx) in enumerate(offsets))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shifted_sum(y, offsets):
  """``out[p] = sum_t y[p + offsets[t], t]`` (zero where ``p + offsets[t]``
  falls outside the map), for ``y`` of shape (n, h, w, taps, c).

  The backward pass pads the output gradient once and slices every tap's
  shifted gradient out of it. Autodiff's would pad each tap's slice back to
  the full padded size: XLA:CPU materialised all of those, at once (33 at
  321x321 with four ASPP branches)."""
  return _shifted_sum(y, offsets)


def _shifted_sum_fwd(y, offsets):
  return _shifted_sum(y, offsets), None


def _shifted_sum_bwd(offsets, _, g):
  n, h, w = g.shape[:3]
  ph, pw = _reach(offsets)
  g = jnp.pad(g, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  return (jnp.stack([g[:, ph - dy:ph - dy + h, pw - dx:pw - dx + w] for dy, dx in offsets],
                    axis=3),)


shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)
