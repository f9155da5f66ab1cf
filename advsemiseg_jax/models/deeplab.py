"""DeepLab-v2 generator: Caffe-style dilated ResNet with the ASPP head.

Parameter names follow the authors' PyTorch module so that conversion is a
renaming: ``conv1``/``bn1`` (stem), ``layer{1..4}_{block}`` with
``conv1, bn1, conv2, bn2, conv3, bn3, downsample_conv, downsample_bn``, and the
head ``layer5`` with ``conv2d_list_{0..3}``.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from advsemiseg_jax.models import layers

STAGE_SIZES = {
    "resnet101": (3, 4, 23, 3),
    "resnet50": (3, 4, 6, 3),
    "tiny": (1, 1, 1, 1),
}
ASPP_DILATIONS = (6, 12, 18, 24)
OUTPUT_STRIDE = 8

# The backbone starts from torch-like He initialisation (training from
# scratch); the head from N(0, 0.01) as in the authors' code.
_backbone_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_head_init = nn.initializers.normal(stddev=0.01)


class Bottleneck(nn.Module):
  """Caffe-style bottleneck: the stride sits on the first 1x1 convolution."""
  planes: int
  conv: Callable[..., Any]
  norm: Callable[..., Any]
  stride: int = 1
  dilation: int = 1
  project: bool = False

  @nn.compact
  def __call__(self, x):
    d = self.dilation
    out = self.conv(self.planes, (1, 1), strides=self.stride, name="conv1")(x)
    conv2 = self.conv(self.planes, (3, 3), padding=((d, d), (d, d)),
                      kernel_dilation=d, name="conv2")
    out = self.norm(name="bn1")(out, relu=True, then=conv2)
    if self.project:
      x = self.conv(self.planes * 4, (1, 1), strides=self.stride,
                    name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    # bn3(conv3(relu(bn2(out))), residual=x), as one op when recomputing.
    last = layers.ThenNorm(self.conv(self.planes * 4, (1, 1), name="conv3"),
                           self.norm(name="bn3"), residual=x)
    return self.norm(name="bn2")(out, relu=True, then=last)


class ASPP(nn.Module):
  """The authors' ``Classifier_Module``: dilated 3x3 convs, outputs summed.

  ``num_branches=2`` reproduces the early return in the authors' forward (only
  dilations 6 and 12 contribute); all four branches' parameters exist either
  way, as they do in the authors' module.
  """
  num_classes: int
  dilations: Sequence[int] = ASPP_DILATIONS
  num_branches: int = 4
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    if self.conv_impl == "dot":
      params = [_ConvParams(self.num_classes, x.shape[-1], name=f"conv2d_list_{i}")()
                for i in range(len(self.dilations))]
      used = params[:self.num_branches]
      return layers.summed_dilated_convs(
          x, [k for k, _ in used], [b for _, b in used],
          self.dilations[:self.num_branches], self.dtype)
    outs = []
    for i, d in enumerate(self.dilations):
      conv = layers.Conv(self.num_classes, (3, 3), padding=((d, d), (d, d)),
                     kernel_dilation=d, use_bias=True, kernel_init=_head_init,
                     dtype=self.dtype, name=f"conv2d_list_{i}")
      if i < self.num_branches:
        outs.append(conv(x))
      else:  # The parameters exist (torch has them) but take no part.
        conv(jnp.zeros((1, 1, 1, x.shape[-1]), x.dtype))
    return sum(outs)


class _ConvParams(nn.Module):
  """The ``kernel`` and ``bias`` of a 3x3 ASPP ``nn.Conv`` (same names, shapes
  and initialisers), for the ``dot`` implementation that applies them itself."""
  features: int
  in_features: int

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _head_init, (3, 3, self.in_features, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return kernel, bias


class DeepLabV2(nn.Module):
  """DeepLab-v2 (output stride 8). Returns logits at 1/8 of the input size.

  Use ``upsample_logits`` (or ``layers.resize_bilinear``) to bring them to
  the input size with align_corners=True, as the authors' code does.
  """
  num_classes: int
  stage_sizes: Sequence[int] = STAGE_SIZES["resnet101"]
  width: int = 64
  aspp_branches: int = 4
  bn_mode: str = "batch_stats"
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  remat_stages: Sequence[int] = ()
  bn_backward: str = "written"

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(layers.conv_module(self.conv_impl), use_bias=False,
                             dtype=self.dtype, kernel_init=_backbone_init)
    norm = layers.batch_norm(self.bn_mode, train, self.dtype, self.bn_backward)
    x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)),
             name="conv1")(x.astype(self.dtype))
    x = norm(name="bn1")(x, relu=True)
    x = layers.max_pool_ceil(x, 3, 2, 1)
    # (stride, dilation) of layer1..layer4: output stride 8.
    plan = ((1, 1), (2, 1), (1, 2), (1, 4))
    for i, (blocks, (stride, dilation)) in enumerate(zip(self.stage_sizes, plan)):
      for j in range(blocks):
        block = Bottleneck(self.width * 2**i, conv, norm,
                           stride=stride if j == 0 else 1, dilation=dilation,
                           project=(j == 0), name=f"layer{i + 1}_{j}")
        # Stages in remat_stages keep only block inputs for the backward pass.
        x = layers.remat_call(block, x) if i + 1 in self.remat_stages else block(x)
    x = ASPP(self.num_classes, num_branches=self.aspp_branches,
             dtype=self.dtype, conv_impl=self.conv_impl, name="layer5")(x)
    return x.astype(jnp.float32)


def upsample_logits(logits, size):
  """Bilinear (align_corners=True) upsampling of NHWC logits to ``size``."""
  return layers.resize_bilinear(logits, size)
