"""Evaluation protocols (pad, whole, sliding) and test-time augmentation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advsemiseg_jax import evaluate, models
from advsemiseg_jax.validate import ConfigError, validate_config


class Pointwise:
  """A stand-in for S with output stride 1: logits = pixel @ w, so a pixel's
  prediction does not depend on where a window or canvas puts it."""

  def apply(self, variables, x, train=False):
    return jnp.einsum("bhwc,ck->bhwk", x, variables["w"])


def _pointwise_vars(num_classes=4, seed=0):
  return {"w": jax.random.normal(jax.random.PRNGKey(seed), (3, num_classes))}


@pytest.fixture(scope="module")
def tiny():
  """The demo quick config's S (width 8) and its initial variables."""
  from advsemiseg_jax.config import load_config
  from conftest import ROOT
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  generator = models.build_generator(config.model, 4)
  variables = jax.jit(lambda r: generator.init(r, jnp.zeros((1, 33, 33, 3)), train=False))(
      jax.random.PRNGKey(1))
  return generator, variables


def _mirror_symmetric(variables):
  """Every conv kernel (HWIO) averaged with its left-right mirror: the network
  then commutes with a horizontal flip on odd-sized inputs."""
  return jax.tree.map(lambda v: (v + v[:, ::-1]) / 2 if v.ndim == 4 else v, variables)


def test_window_starts_cover_and_end_at_edge():
  assert evaluate.window_starts(1024, 512, 341) == [0, 341, 512]
  assert evaluate.window_starts(2048, 1024, 683) == [0, 683, 1024]
  assert evaluate.window_starts(100, 128, 64) == [0]
  assert evaluate.window_starts(96, 32, 32) == [0, 32, 64]


def test_make_protocol(quick_config):
  d = quick_config.data
  assert evaluate.make_protocol(d) == evaluate.Protocol("pad", (64, 64))
  d.eval_protocol = "whole"
  assert evaluate.make_protocol(d, (500, 375)).canvas == (504, 376)
  with pytest.raises(ValueError, match="needs the images' sizes"):
    evaluate.make_protocol(d)
  d.eval_protocol = "pad"
  with pytest.raises(ValueError, match="do not fit data.eval_size"):
    evaluate.make_protocol(d, (65, 40))
  d.eval_protocol, d.eval_window, d.eval_stride = "sliding", (32, 48), (16, 24)
  p = evaluate.make_protocol(d)
  assert (p.window, p.stride) == ((32, 48), (16, 24))
  assert "sliding 32x48 windows" in p.describe()


def test_sliding_windows_average_to_the_whole_image():
  variables = _pointwise_vars()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 80, 3))
  pad = evaluate.make_predict_fn(Pointwise(), evaluate.Protocol("pad", (64, 80)))
  sliding = evaluate.make_predict_fn(
      Pointwise(), evaluate.Protocol("sliding", (64, 80), (32, 32), (24, 20)))
  expected = jax.nn.softmax(pad(variables, x)["scores"], -1)
  got = sliding(variables, x)["scores"]
  np.testing.assert_allclose(got, expected, atol=1e-6)
  # A window larger than the canvas: the canvas is padded to it, then cropped.
  big = evaluate.make_predict_fn(
      Pointwise(), evaluate.Protocol("sliding", (64, 80), (96, 96), (96, 96)))
  np.testing.assert_allclose(big(variables, x)["scores"], expected, atol=1e-6)


def test_sliding_with_one_window_equals_pad_on_the_real_network(tiny):
  generator, variables = tiny
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 64, 64, 3)) * 50
  pad = evaluate.make_predict_fn(generator, evaluate.Protocol("pad", (64, 64)))
  one = evaluate.make_predict_fn(
      generator, evaluate.Protocol("sliding", (64, 64), (64, 64), (64, 64)))
  both = jax.jit(lambda v, x: (one(v, x)["scores"],
                               jax.nn.softmax(pad(v, x)["scores"], -1)))
  np.testing.assert_allclose(*both(variables, x), atol=1e-6)


def test_tta_views():
  class T:
    flip, scales = False, ()
  assert evaluate.tta_views(T) == ()
  T.flip = True
  assert evaluate.tta_views(T) == ((1.0, False), (1.0, True))
  T.flip, T.scales = False, (0.5, 1.0)
  assert evaluate.tta_views(T) == ((0.5, False), (1.0, False))


def test_flip_tta_equals_plain_prediction_on_symmetric_input(tiny):
  generator, variables = tiny
  variables = _mirror_symmetric(variables)
  views = ((1.0, False), (1.0, True))
  predict = jax.jit(evaluate.make_predict_fn(generator, evaluate.Protocol("pad", (65, 65)),
                                             views))
  r = jax.random.normal(jax.random.PRNGKey(4), (2, 65, 65, 3)) * 50
  for x in (r + r[:, :, ::-1],   # left-right symmetric input
            r):                  # any input: the un-flip must put pixels back
    out = predict(variables, x)
    plain = jax.nn.softmax(out["scores"], -1)
    np.testing.assert_allclose(out["tta"], plain, atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(out["tta"], -1), jnp.argmax(plain, -1))
  # A flip along the wrong axis would not survive a vertically asymmetric input.
  assert not np.allclose(plain, plain[:, ::-1], atol=1e-3)


def test_flip_tta_averages_the_unflipped_view(tiny):
  generator, variables = tiny
  predict = jax.jit(evaluate.make_predict_fn(
      generator, evaluate.Protocol("pad", (64, 64)), ((1.0, False), (1.0, True))))
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 64, 64, 3)) * 50
  out = predict(variables, x)
  flipped = predict(variables, x[:, :, ::-1])["scores"]
  expected = (jax.nn.softmax(out["scores"], -1)
              + jax.nn.softmax(flipped, -1)[:, :, ::-1]) / 2
  np.testing.assert_allclose(out["tta"], expected, atol=1e-6)


def test_multiscale_tta_on_a_flat_image_is_the_plain_prediction():
  variables = _pointwise_vars()
  x = jnp.ones((1, 40, 56, 3)) * jnp.array([10.0, -20.0, 5.0])
  predict = evaluate.make_predict_fn(Pointwise(), evaluate.Protocol("pad", (40, 56)),
                                     ((0.5, False), (0.75, True), (1.5, False)))
  out = predict(variables, x)
  assert out["tta"].shape == (1, 40, 56, 4)
  np.testing.assert_allclose(out["tta"], jax.nn.softmax(out["scores"], -1), atol=1e-6)


def test_eval_step_reports_plain_and_tta_confusions():
  variables = _pointwise_vars()
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16, 3))
  labels = jnp.where(jnp.arange(16)[None, :, None] < 8, 1, 255) * jnp.ones((2, 16, 16),
                                                                             jnp.int32)
  step = evaluate.make_eval_step(Pointwise(), 4, evaluate.Protocol("pad", (16, 16)),
                                 ((1.0, False), (0.5, False)))
  conf = step(variables, x, labels)
  assert set(conf) == {"plain", "tta"}
  for c in conf.values():
    assert int(c.sum()) == 2 * 8 * 16 and int(c[1].sum()) == 2 * 8 * 16


@pytest.mark.parametrize("field, value, message", [
    ("data.eval_protocol", "crop", "data.eval_protocol must be one of"),
    ("data.eval_stride", (600, 10), "data.eval_stride=(600, 10)"),
    ("tta.scales", (1.0, 0.0), "tta.scales must be positive"),
    ("predict.overlay_alpha", 2.0, "predict.overlay_alpha"),
    ("mode", "predict", "predict.input=FOLDER"),
])
def test_validate_rejects_bad_eval_fields(quick_config, field, value, message):
  quick_config.data.eval_protocol = "sliding"
  section, _, name = field.rpartition(".")
  target = quick_config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(quick_config)
