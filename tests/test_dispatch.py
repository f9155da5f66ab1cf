"""XLA:CPU runs main.py's steps inline (parallel.set_cpu_inline_execution):
one step's temporary buffer alive at a time, whatever the loop waits for."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from advsemiseg_jax import allocator, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A chain of calls like train.py's loop (each takes the last one's output and
# nobody waits in between), each with a 64 MiB temporary buffer: how many
# such buffers the process's resident set grew by across 40 calls, and
# whether a call's result was ready when the call returned.
_CHAIN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    from advsemiseg_jax import parallel
    inline = parallel.set_cpu_inline_execution()
    import jax, jax.numpy as jnp
    from benchmarks.machine import peak_rss_bytes, reset_peak_rss, rss_bytes

    @jax.jit
    def step(x, carry):
      # sin(x) is written out for the product: the temporary buffer.
      return jnp.dot(jnp.sin(x + carry[0, 0]), jnp.ones((x.shape[1], 8))) * 1e-9

    x = jnp.ones((4096, 4096))
    carry = jnp.zeros((4096, 8))
    compiled = step.lower(x, carry).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready((x, carry))
    reset_peak_rss()
    base = rss_bytes()
    ready = []
    for _ in range(40):
      carry = compiled(x, carry)
      ready.append(carry.is_ready())
    jax.block_until_ready(carry)
    print(json.dumps(dict(inline=inline, temp=temp, ready=ready,
                          buffers=(peak_rss_bytes() - base) / temp)))
    """)


def _run_chain(tmp_path, async_dispatch=None, preload=None):
  script = tmp_path / "chain.py"
  script.write_text(_CHAIN.format(root=ROOT))
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", parallel.CPU_ASYNC_DISPATCH_ENV)}
  env["JAX_PLATFORMS"] = "cpu"
  if async_dispatch is not None:
    env[parallel.CPU_ASYNC_DISPATCH_ENV] = async_dispatch
  if preload:
    env["LD_PRELOAD"] = preload
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"


@pytest.fixture
def async_dispatch_before():
  """JAX's async-dispatch setting before the test, restored after it."""
  import jax
  before = jax.config.read(ASYNC_DISPATCH)
  yield before
  jax.config.update(ASYNC_DISPATCH, before)


def test_inline_execution_is_set_unless_the_user_chose(async_dispatch_before):
  import jax
  assert not parallel.set_cpu_inline_execution(
      {parallel.CPU_ASYNC_DISPATCH_ENV: "1"})
  assert jax.config.read(ASYNC_DISPATCH) == async_dispatch_before
  assert parallel.set_cpu_inline_execution({})
  assert jax.config.read(ASYNC_DISPATCH) is False


def test_prepare_cpu_backend_sets_both_and_keeps_the_users_choices(
    monkeypatch, async_dispatch_before):
  """main.py's and the benchmarks' one call: YNNPACK flags and inline
  execution, each left alone where the user's environment sets it."""
  import jax
  import jaxlib
  checked = tuple(int(v) for v in jaxlib.__version__.split(".")[:2]) >= (
      parallel.CPU_XLA_FLAGS_CHECKED_FROM)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  done = parallel.prepare_cpu_backend(True, {})
  assert done["inline"] and jax.config.read(ASYNC_DISPATCH) is False
  assert done["xla_flags"] == os.environ["XLA_FLAGS"]
  assert done["xla_flags"].startswith("--xla_force_host_platform_device_count=1")
  assert all((f in done["xla_flags"]) == checked for f in parallel.CPU_XLA_FLAGS)

  jax.config.update(ASYNC_DISPATCH, async_dispatch_before)
  user = "--xla_cpu_experimental_ynn_fusion_type=+dot"
  monkeypatch.setenv("XLA_FLAGS", user)
  done = parallel.prepare_cpu_backend(True, {parallel.CPU_ASYNC_DISPATCH_ENV: "1"})
  assert done == dict(xla_flags=user, inline=False)
  assert jax.config.read(ASYNC_DISPATCH) == async_dispatch_before

  monkeypatch.setenv("XLA_FLAGS", "")
  assert parallel.prepare_cpu_backend(False, {})["xla_flags"] == ""


def test_steps_return_done_inline_and_dispatched_with_the_users_choice(tmp_path):
  """Under main.py's setting a call returns with its result computed (the
  temporary buffer already given back); with JAX_CPU_ENABLE_ASYNC_DISPATCH=1
  it returns at once, as JAX's default does."""
  inline = _run_chain(tmp_path)
  assert inline["inline"] and all(inline["ready"]), inline
  dispatched = _run_chain(tmp_path, async_dispatch="1")
  assert not dispatched["inline"] and not all(dispatched["ready"]), dispatched


@pytest.mark.skipif(allocator.find_tcmalloc() is None,
                    reason="tcmalloc (main.py's CPU allocator) is not installed")
def test_one_temporary_buffer_at_a_time_under_tcmalloc(tmp_path):
  """Under tcmalloc (which keeps freed memory for the next step), JAX's
  asynchronous dispatch kept two steps' temporary buffers resident (the next
  step's buffer taken before the last one's was given back: measured 2.0
  buffers in 5 of 5 runs); inline execution keeps one."""
  library = allocator.find_tcmalloc()
  inline = _run_chain(tmp_path, preload=library)
  assert inline["temp"] >= 60 * 2**20, inline
  assert inline["buffers"] < 1.5, inline
  dispatched = _run_chain(tmp_path, async_dispatch="1", preload=library)
  assert dispatched["buffers"] > 1.5, dispatched
