"""benchmarks/op_profile.py: a real jax.profiler trace of a compiled function,
attributed to the instructions of its HLO module."""

import jax
import jax.numpy as jnp
import pytest
from conftest import load_benchmark
from jax import lax


@pytest.fixture(scope="module")
def op_profile():
  return load_benchmark("op_profile")


def step(state, x):
  """A state-in, state-out function like the train step: a convolution, a
  matrix product and a reduction."""
  y = lax.conv_general_dilated(x, state["w"], (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = jnp.tanh(y.reshape(-1, 16) @ state["m"])
  return {"w": state["w"] * 0.99, "m": state["m"] + z.mean()}, z.sum()


def test_profile_attributes_every_event_to_the_module(op_profile, tmp_path):
  state = {"w": jnp.ones((3, 3, 8, 16)) * 0.01, "m": jnp.eye(16)}
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 8))
  compiled = jax.jit(step).lower(state, x).compile()
  summary = op_profile.profile(compiled, (state, x), steps=3, logdir=str(tmp_path))
  assert summary["steps"] == 3 and summary["module"] == "jit_step"
  assert summary["events"] >= 3
  kinds = {name for name, _, _ in summary["categories"]}
  assert not any(k.startswith("(not in the module") for k in kinds), kinds
  assert any("convolution" in k for k in kinds), kinds
  total = sum(seconds for _, seconds, _ in summary["categories"])
  assert total == pytest.approx(summary["op_s"]) and total > 0
  # Intervals overlap at most: busy time is at most the op time.
  assert 0 < summary["busy_s"] <= summary["op_s"] * (1 + 1e-9)
  assert summary["top"][0][2] == max(seconds for _, _, seconds, _ in summary["top"])
  table = op_profile.format_table(summary, step_s=summary["wall_s"])
  assert "| op kind | ms per step |" in table and "longest ops" in table


def test_hlo_kinds(op_profile):
  text = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[]}

%fused_dot (p: f32[4]) -> f32[] {
  %p = f32[4]{0} parameter(0)
  ROOT %d = f32[] dot(%p, %p), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[4]) -> f32[] {
  %a = f32[4]{0} parameter(0)
  %cc = (f32[4]{0}, u8[16]{0}) custom-call(%a), custom_call_target="__cudnn$convForward"
  %g = f32[4]{0} get-tuple-element(%cc), index=0
  ROOT %f = f32[] fusion(%g), kind=kOutput, calls=%fused_dot
}
"""
  instructions, computations = op_profile.parse_hlo(text)
  assert instructions["cc"][0] == "custom-call" and instructions["cc"][1].startswith("(f32[4]")
  assert computations["fused_dot"] == {"parameter", "dot"}
  kind = lambda name: op_profile.category(name, instructions, computations)
  assert kind("cc") == "custom-call __cudnn$convForward"
  assert kind("f") == "fusion kOutput: dot"
  assert kind("g") == "get-tuple-element"
  assert kind("command_buffer_12").startswith("command buffers")
  assert kind("copy.7") == "(not in the module: copy)"
