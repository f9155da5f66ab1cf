"""The FLOP counts of benchmarks/train_step.py: the analytic count with all
taps, with in-bounds taps only, and XLA's cost analysis (the 5% cross-check)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_benchmark
from jax import lax

from advsemiseg_jax import build


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("train_step")


def conv(x, w, stride, dilation):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME", rhs_dilation=(dilation,) * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size,kernel,stride,dilation", [
    (9, 3, 1, 1), (11, 3, 1, 4), (41, 3, 1, 12), (33, 7, 2, 1), (20, 4, 2, 1)])
def test_conv_counts(bench, size, kernel, stride, dilation):
  x, w = jnp.ones((2, size, size, 5)), jnp.ones((kernel, kernel, 5, 6))
  forward = jax.make_jaxpr(lambda x, w: conv(x, w, stride, dilation))(x, w).jaxpr
  out = -(-size // stride)
  assert bench.jaxpr_flops(forward) == 2 * 2 * out * out * 6 * 5 * kernel * kernel
  # The forward conv alone: XLA's rule exactly.
  assert bench.jaxpr_flops(forward, in_bounds=True) == bench.xla_flops(
      jax.jit(lambda x, w: conv(x, w, stride, dilation)).lower(x, w))
  # Forward and both backward convs (one of them on a dilated input when
  # strided): XLA adds only the elementwise square and sum on top.
  grad = lambda x, w: jax.grad(lambda x, w: (conv(x, w, stride, dilation) ** 2).sum(),
                               argnums=(0, 1))(x, w)
  counted = bench.jaxpr_flops(jax.make_jaxpr(grad)(x, w).jaxpr, in_bounds=True)
  elementwise = 3 * 2 * out * out * 6
  assert counted < bench.jaxpr_flops(jax.make_jaxpr(grad)(x, w).jaxpr)
  assert 0 <= bench.xla_flops(jax.jit(grad).lower(x, w)) - counted <= elementwise


def test_a_cond_counts_one_branch(bench):
  """``lax.platform_dependent`` (as ``layers.kernel_gradients`` uses it) is a
  cond over the same product per platform; one branch runs."""
  x, y = jnp.ones((8, 5)), jnp.ones((8, 3))
  tn = lambda x, y: lax.dot_general(x, y, (((0,), (0,)), ((), ())))
  f = lambda x, y: lax.platform_dependent(x, y, cpu=lambda x, y: tn(x, y) + 1, default=tn)
  assert bench.jaxpr_flops(jax.make_jaxpr(f)(x, y).jaxpr) == 2 * 8 * 5 * 3
  g = lambda p, x, y: lax.cond(p, lambda: x.T @ y, lambda: tn(x @ jnp.ones((5, 5)), y))
  assert bench.jaxpr_flops(jax.make_jaxpr(g)(True, x, y).jaxpr) == 2 * 8 * 5 * 3 + 2 * 8 * 5 * 5


def test_train_step_within_five_percent_of_xla(bench, quick_config):
  """The acceptance check of the speed issue, on the tiny full step (D and
  the unlabeled branch on)."""
  config = quick_config
  config.loss.semi_start = 0
  state, step_fn = bench.build_state(config, config.data.num_classes)
  batch = bench.synthetic_batch(config, config.data.batch_size, tuple(config.data.crop_size))
  jaxpr = jax.make_jaxpr(step_fn)(state, batch).jaxpr
  in_bounds = bench.jaxpr_flops(jaxpr, in_bounds=True)
  assert in_bounds < bench.jaxpr_flops(jaxpr)
  ratio = bench.step_xla_flops(config, state, batch) / in_bounds
  assert 1.0 <= ratio <= 1.05, ratio
  # The timed step's loop (the sequential passes on a CPU) is counted once
  # by XLA: why the table counts the step with its loops unrolled.
  if build.resolve_sequential_passes(config.optim.sequential_passes):
    assert bench.xla_flops(jax.jit(step_fn).lower(state, batch)) < 0.8 * in_bounds


def test_unrolled_loops_are_the_same_step(bench, quick_config):
  """``unroll_loops`` (what the FLOPs table counts): the same step as the
  timed one, with both of its loops (``iter_size``'s microbatches, and the
  sequential passes inside each)."""
  config = quick_config
  config.loss.semi_start = 0
  config.optim.sequential_passes = True
  config.optim.iter_size = 2
  generator, discriminator, state, step_fn = build.build_training(config, config.data.num_classes)
  unrolled = build.build_step(config, generator, discriminator, state.g_params, unroll_loops=True)
  batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(
      config, config.data.batch_size, tuple(config.data.crop_size)).items()}
  lowered = jax.jit(unrolled).lower(state, batch)
  assert " while" not in lowered.as_text(dialect="hlo")
  assert " while" in jax.jit(step_fn).lower(state, batch).as_text(dialect="hlo")
  want, got = jax.jit(step_fn)(state, batch), lowered.compile()(state, batch)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_table_units_fit_small_and_large_models(bench):
  """A ResNet-101 step reads as before (T), a tiny one does not read 0.000."""
  assert bench.scaled(0.5384e12) == "0.538 T"
  assert bench.scaled(0.119e9) == "0.119 G"
  assert bench.scaled(8.9e6, 1) == "8.9 M"
  assert bench.scaled(38.72e9, 1) == "38.7 G"
  assert bench.gib(1.48 * 2**30) == "1.48 GiB"
  assert bench.gib(3.5 * 2**20) == "3.5 MiB"


def test_compile_only_then_the_table_from_the_cache(tmp_path):
  """gpu_check.sh's two phases on the tiny model. ``--compile_only`` compiles
  the step into JAX_COMPILATION_CACHE_DIR and stops before any step runs;
  a second run loads that step from the cache and prints every row of the table, in the units a small model needs, with
  the closed form's note where conv_impl=dot skips the ASPP's padding taps
  (at 33x33 most of them)."""
  import os
  import re
  import subprocess
  import sys
  from conftest import ROOT
  cache = tmp_path / "xla_cache"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"),
             "--config=configs/demo.py:quick", "--size=33", "--batch=2", "--xla_cpu_tuning=0"]
  first = subprocess.run(command + ["--compile_only"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
  assert f"persistent compilation cache: {cache}" in first.stdout, first.stdout
  assert "step time" not in first.stdout   # nothing was run
  steps = lambda: sorted(p for p in os.listdir(cache) if p.startswith("jit_train_step"))
  compiled = steps()
  assert len(compiled) == 1, os.listdir(cache)

  # JAX_LOG_COMPILES: JAX logs each persistent cache hit as a warning.
  out = subprocess.run(command + ["--steps=2", "--warmup=1"], cwd=ROOT,
                       env=dict(env, JAX_LOG_COMPILES="1"), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Persistent compilation cache hit for 'jit_train_step'" in out.stderr, out.stderr[-3000:]
  assert steps() == compiled
  rows = dict(re.findall(r"^\| (.+?) +\| (.*) \|$", out.stdout, re.M))
  for key in ("machine", "compile", "step time, median", "images/s (labeled)",
              "FLOPs/step, analytic, all taps", "FLOPs/step, analytic, in-bounds taps",
              "FLOPs/step, XLA cost analysis", "G forward per image, closed form", "achieved",
              "memory, XLA estimate (args+temp+out)", "loss_g after the last step"):
    assert key in rows, (key, out.stdout)
  assert "batch 2, 33x33, backbone tiny" in rows["step"]
  assert float(rows["step time, median"].split()[0]) > 0
  for key in ("FLOPs/step, analytic, all taps", "FLOPs/step, analytic, in-bounds taps",
              "FLOPs/step, XLA cost analysis"):
    value, prefix = rows[key].split()[:2]
    assert float(value) >= 0.1 and prefix in ("k", "M", "G"), rows[key]
  ratio = float(re.search(r"XLA / in-bounds = ([\d.]+)", rows["FLOPs/step, XLA cost analysis"])[1])
  assert 1.0 <= ratio < 1.2   # elementwise work, a larger share in a tiny model
  assert "not computed" in rows["G forward per image, closed form"]
  assert rows["memory, XLA estimate (args+temp+out)"].endswith("MiB")
  assert float(rows["loss_g after the last step"]) > 0


def test_recompute_act_runs_no_convolution_twice(bench, quick_config):
  """``bn_backward=recompute_act`` does the written backward's arithmetic;
  ``recompute`` runs each bottleneck's conv3 again (6.7% of a ResNet-101
  step at 161x161 and 321x321)."""
  config = quick_config
  config.loss.semi_start = 0
  counts = {}
  for mode in ("written", "recompute_act", "recompute"):
    config.model.bn_backward, config.model.conv_impl = mode, "dot"
    _, _, abstract, step_fn = build.abstract_training(config, config.data.num_classes)
    batch = bench.synthetic_batch(config, 2, (33, 33))
    counts[mode] = bench.jaxpr_flops(jax.make_jaxpr(step_fn)(abstract, batch).jaxpr)
  assert counts["recompute_act"] == counts["written"] < counts["recompute"]
