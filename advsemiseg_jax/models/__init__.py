"""Model builders from the ``model`` section of a config."""
import jax
import jax.numpy as jnp

from advsemiseg_jax.models.deeplab import (ASPP_DILATIONS, OUTPUT_STRIDE,
                                           STAGE_SIZES, DeepLabV2,
                                           upsample_logits)
from advsemiseg_jax.models.discriminator import (FCDiscriminator,
                                                 ImageDiscriminator,
                                                 confidence_logits)
from advsemiseg_jax.models.layers import resize_bilinear

DISCRIMINATORS = {"fc": FCDiscriminator, "image": ImageDiscriminator}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_conv_impl(conv_impl: str, backend: str = None) -> str:
  """``model.conv_impl`` for this run: ``auto`` is ``dot`` on CPU and GPU
  (measured faster on both: docs/performance.md) and ``xla`` on TPU (not
  measured there). Both give the same parameters, so checkpoints move freely
  between machines."""
  if conv_impl != "auto":
    return conv_impl
  return "xla" if (backend or jax.default_backend()) == "tpu" else "dot"


def resolve_bn_backward(bn_backward: str, backend: str = None) -> str:
  """``model.bn_backward`` for this run: ``auto`` is ``recompute`` on CPU
  (the written backward pass, which keeps torch's activations, and which
  recomputes a BatchNorm + ReLU's output that feeds a convolution, and that
  convolution's output in a bottleneck's last BatchNorm, instead of keeping
  them: XLA:CPU keeps twice as many activations with JAX's own) and
  ``autodiff`` elsewhere (faster on GPU, no more memory). Same values up to
  rounding either way. ``recompute_act``, never picked by ``auto``, keeps
  the convolution's output: no convolution runs twice, for more memory
  (docs/performance.md, Options)."""
  if bn_backward != "auto":
    return bn_backward
  return "recompute" if (backend or jax.default_backend()) == "cpu" else "autodiff"


def build_generator(model_config, num_classes: int) -> DeepLabV2:
  """DeepLab-v2 from ``config.model`` (backbone, width, aspp_branches, bn_mode,
  compute_dtype, conv_impl, remat_stages, bn_backward)."""
  if model_config.backbone not in STAGE_SIZES:
    raise ValueError(f"model.backbone must be one of {sorted(STAGE_SIZES)}, "
                     f"got {model_config.backbone!r}")
  return DeepLabV2(num_classes=num_classes,
                   stage_sizes=STAGE_SIZES[model_config.backbone],
                   width=model_config.width,
                   aspp_branches=model_config.aspp_branches,
                   bn_mode=model_config.bn_mode,
                   dtype=DTYPES[model_config.compute_dtype],
                   conv_impl=resolve_conv_impl(model_config.conv_impl),
                   remat_stages=tuple(model_config.remat_stages),
                   bn_backward=resolve_bn_backward(model_config.bn_backward))


def build_discriminator(model_config):
  """The discriminator named by ``config.model.discriminator`` ('fc'|'image')."""
  if model_config.discriminator not in DISCRIMINATORS:
    raise ValueError(f"model.discriminator must be one of "
                     f"{sorted(DISCRIMINATORS)}, got {model_config.discriminator!r}")
  return DISCRIMINATORS[model_config.discriminator](
      width=model_config.disc_width, conv_impl=resolve_conv_impl(model_config.conv_impl))


__all__ = ["ASPP_DILATIONS", "OUTPUT_STRIDE", "STAGE_SIZES", "DeepLabV2",
           "FCDiscriminator", "ImageDiscriminator", "build_generator",
           "build_discriminator", "confidence_logits", "resize_bilinear",
           "resolve_bn_backward", "resolve_conv_impl", "upsample_logits"]
