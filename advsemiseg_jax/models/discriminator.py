"""The discriminators: fully convolutional (the paper's) and image-level (ablation)."""
import flax.linen as nn
import jax.numpy as jnp

from advsemiseg_jax import ordering
from advsemiseg_jax.models import layers

NUM_DOWNSAMPLINGS = 5


def _conv(features, name, conv_impl):
  """A 4x4 stride-2 convolution padded by 1 of ``model.conv_impl``
  (``layers.conv_module``: ``dot`` computes its kernel gradient as one GEMM,
  with the same parameters)."""
  return layers.conv_module(conv_impl)(features, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                                       use_bias=True, name=name)


def _trunk(x, width, conv_impl):
  """conv1..conv4 (4x4, stride 2, padding 1) with LeakyReLU(0.2).

  Called inside a parent's compact method, so the parameters are named
  conv1..conv4 at the top level, as in the authors' module.
  """
  x = x.astype(jnp.float32)
  for i in range(4):
    x = _conv(width * 2**i, f"conv{i + 1}", conv_impl)(x)
    # The slope, 0.2, tied to x (ordering.computed_after): as a constant,
    # XLA:CPU writes it out as a full-size array for its YNNPACK fusions,
    # early in the step, and keeps it through S's passes (16 MiB at 161x161).
    x = nn.leaky_relu(x, ordering.computed_after(jnp.float32(0.2), x))
  return x


class FCDiscriminator(nn.Module):
  """Five 4x4 stride-2 convs (64/128/256/512/1), LeakyReLU 0.2, no norm.

  Input: NHWC class-probability maps. Output: NHW1 logits at 1/32 of the
  input (321 -> 10). ``confidence_logits`` upsamples them to the input size.
  ``conv_impl``: ``xla`` or ``dot`` (``layers.conv_module``).
  """
  width: int = 64
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, probs):
    x = _trunk(probs, self.width, self.conv_impl)
    return _conv(1, "classifier", self.conv_impl)(x)


class ImageDiscriminator(nn.Module):
  """The paper's "no FCD" ablation: one image-level logit per image.

  The classifier conv is replaced by a fully connected layer on the globally
  averaged conv4 features (size-independent); the logit is returned as a
  1x1 map, so upsampling broadcasts it to every pixel.
  """
  width: int = 64
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, probs):
    x = _trunk(probs, self.width, self.conv_impl)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(1, name="classifier")(x)[:, None, None, :]


def confidence_logits(d_out, size):
  """D's output upsampled to ``size`` (align_corners=True), as NHW logits."""
  return layers.resize_bilinear(d_out, size)[..., 0]
