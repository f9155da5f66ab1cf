"""Mixed precision (model.compute_dtype=bfloat16): S's convolutions run in
bfloat16; parameters, BN statistics and losses stay float32; training tracks
the float32 run."""
import jax
import jax.numpy as jnp
import numpy as np

from advsemiseg_jax import parallel
from advsemiseg_jax.train import build_training

from test_step import fixed_batch

STEPS = 10


def train(config):
  mesh = parallel.make_mesh(jax.devices()[:1])
  _, _, state, step_fn = build_training(config, config.data.num_classes)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = parallel.jit_train_step(step_fn, mesh)
  batch = parallel.to_global(fixed_batch(), mesh)
  conv_dtypes = {str(e.invars[0].aval.dtype) for e in _eqns(jax.make_jaxpr(step_fn)(
      state, batch).jaxpr) if e.primitive.name == "conv_general_dilated"}
  history = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss_ce"]))
  return jax.device_get(state), history, conv_dtypes


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for v in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(v, "jaxpr", v)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_bfloat16_tracks_float32(quick_config):
  quick_config.num_steps = 1000
  quick_config.optim.lr_g = 2e-3   # a smooth curve (0.02 jumps around in float32 too)
  f32_state, f32, f32_convs = train(quick_config)
  quick_config.model.compute_dtype = "bfloat16"
  bf16_state, bf16, bf16_convs = train(quick_config)
  assert f32_convs == {"float32"}
  assert "bfloat16" in bf16_convs          # S's convolutions (D's stay float32)
  for tree in (bf16_state.g_params, bf16_state.g_batch_stats, bf16_state.d_params,
               bf16_state.g_opt_state):
    assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype("float32")}
  assert all(np.isfinite(bf16))
  assert np.mean(bf16[-2:]) < 0.5 * bf16[0]   # it learns ...
  # ... along the float32 curve (measured: within 1% at every step).
  np.testing.assert_allclose(bf16, f32, rtol=0.05)
