"""How checkpoints are written: inline on a CPU (no copy of the state), in
the background elsewhere or when ``config.checkpoint_async`` asks, and at
most ``config.checkpoint_write_mib`` encoded at once."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from advsemiseg_jax import checkpoint
from advsemiseg_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_background_saves_are_auto_on_a_cpu_off_unless_asked():
  assert base_config().checkpoint_async is None   # auto
  assert not checkpoint.saves_in_background(None)  # the tests run on a CPU
  assert checkpoint.saves_in_background(True)
  assert not checkpoint.saves_in_background(False)


def test_write_limit_is_the_config_or_the_largest_array():
  state = {"a": jnp.zeros((1024, 1024)), "b": jax.ShapeDtypeStruct((4, 2**20), jnp.float32),
           "step": jnp.zeros((), jnp.int32)}
  assert checkpoint.write_limit(state, 0) is None
  assert checkpoint.write_limit(state, 64) == 64 * 2**20
  assert checkpoint.write_limit(state, 8) == 16 * 2**20   # "b", 16 MiB
  assert base_config().checkpoint_write_mib == 64


# Saves a 128 MiB state of random values (incompressible, as trained weights
# are: Orbax compresses what it writes), lets a donating step overwrite its
# buffers, and reports how much the process's high-water mark rose above its
# resident set before the save, and whether step 1 restores the values it
# had when saved.
_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from benchmarks.machine import peak_rss_bytes, reset_peak_rss, rss_bytes
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from advsemiseg_jax import checkpoint
background = {background!r}
state = {{f"w{{i}}": jax.random.normal(jax.random.PRNGKey(i), (1024, 4096)) for i in range(8)}}
saved = {{k: np.asarray(v).copy() for k, v in state.items()}}
step = jax.jit(lambda s: jax.tree.map(lambda a: -a, s), donate_argnums=0)  # exact
state = jax.block_until_ready(step(state))
mngr = checkpoint.manager({workdir!r}, 2, background, checkpoint.write_limit(state, {mib!r}))
before = rss_bytes()
reset_peak_rss()   # the high-water mark from here on
mngr.save(1, args=ocp.args.StandardSave(state))
grew_in_save = (peak_rss_bytes() - before) / 1024
finished_at_return = mngr.all_steps() == [1]
state = jax.block_until_ready(step(state))
mngr.wait_until_finished()
grew = (peak_rss_bytes() - before) / 1024   # the background's copy included
restored = mngr.restore(1, args=ocp.args.StandardRestore(
    jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
exact = all(np.array_equal(np.asarray(restored[k]), -saved[k]) for k in saved)
now = all(np.array_equal(np.asarray(state[k]), saved[k]) for k in saved)
print(json.dumps({{"grew_mib": grew / 1024, "grew_in_save_mib": grew_in_save / 1024,
                  "exact": exact, "now": now,
                  "finished_at_return": finished_at_return}}))
"""


def _save_in_child(tmp_path, background, mib):
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(root=ROOT, background=background, mib=mib,
                                  workdir=str(tmp_path / "wd")))
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  env["JAX_PLATFORMS"] = "cpu"
  # glibc then maps every buffer over 128 KiB on its own and unmaps it when
  # freed, so the resident set is what is alive: freed memory that the
  # allocator kept would hide a copy made in it.
  env["MALLOC_MMAP_THRESHOLD_"] = "131072"
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("background, mib, most_mib, least_mib", [
    # The CPU default, inline with a limit: 1 MiB, below the largest array,
    # which is then the limit (Orbax refuses an array larger than its limit).
    (None, 1, 72, 0),
    (None, 0, None, 90),   # no limit: most of the state encoded at once
    (True, 16, None, 90),  # in the background: Orbax copies the whole state
])
def test_a_cpu_save_holds_no_copy_of_the_state_inline_with_a_limit(
    tmp_path, background, mib, most_mib, least_mib):
  """The state is 128 MiB in 16 MiB arrays. Inline (the CPU default) the save
  writes from the arrays themselves and, with a write limit, holds little
  more (20-50 MiB measured); without one it holds encoded copies of most
  arrays (108-126 MiB), and in the background Orbax copies the state first,
  after ``save()`` returns (161-179 MiB by the end). Every way the
  checkpoint holds the values saved, though the next step donated and
  overwrote their buffers."""
  got = _save_in_child(tmp_path, background, mib)
  assert got["exact"] and got["now"], got
  if background is None:   # all of it inside save()
    assert got["finished_at_return"], got
    assert got["grew_in_save_mib"] >= least_mib, got
    if most_mib is not None:
      assert got["grew_in_save_mib"] < most_mib, got
  else:
    assert got["grew_mib"] >= least_mib, got
