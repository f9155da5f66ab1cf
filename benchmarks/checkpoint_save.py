"""Memory and time of one checkpoint save of a config's training state.

  python benchmarks/checkpoint_save.py --config=configs/voc.py
  python benchmarks/checkpoint_save.py --config=configs/voc.py --write_mib=0,16,64,256 --background=0,1

The state has the shapes and dtypes of the config's TrainState (S's and D's
parameters, batch statistics, optimiser states; ``build.abstract_training``,
no initialiser run) and random values: incompressible, as trained weights
are (Orbax compresses what it writes, so a state of zeros would measure
almost nothing). Each variant, one of ``--background`` (0: inline, 1: in the
background) times one of ``--write_mib`` (``config.checkpoint_write_mib``;
0: no limit), saves it with ``advsemiseg_jax.checkpoint.manager``, as
``train.py`` does, while a step that donates the state overwrites it. One
table, tagged with the machine: the extra resident memory of the save over
what the process held before it (its high-water mark; free memory is handed
back between variants; host memory, on a GPU too), the seconds ``save()`` held training up, and the
seconds until the checkpoint was finished. The first row of each variant
kind is not favoured: a warm-up save runs first.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from advsemiseg_jax import allocator  # noqa: E402

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()  # As main.py does (before JAX starts).

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from advsemiseg_jax import build, checkpoint  # noqa: E402
from advsemiseg_jax.config import apply_overrides, load_config  # noqa: E402
from benchmarks.machine import cpu_model, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def random_state(abstract, seed: int = 0):
  """Arrays of ``abstract``'s shapes and dtypes: normal floats, integers as
  zeros (the step counters)."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
  arrays = [jax.random.normal(k, s.shape, s.dtype) if np.issubdtype(s.dtype, np.floating)
            else jax.numpy.zeros(s.shape, s.dtype) for k, s in zip(keys, leaves)]
  return jax.block_until_ready(jax.tree.unflatten(treedef, arrays))


def measure(state, step, directory: str, background: bool, write_bytes):
  """(state after the step, extra bytes at the high-water mark, seconds in
  ``save()``, seconds until finished) of one save that encodes at most
  ``write_bytes`` at once (None: no limit), and one donating step after it."""
  mngr = checkpoint.manager(directory, 1, background, write_bytes)
  allocator.release_free_memory()
  before = rss_bytes()
  reset_peak_rss()
  start = time.perf_counter()
  mngr.save(1, args=ocp.args.StandardSave(state), force=True)
  blocked = time.perf_counter() - start
  state = jax.block_until_ready(step(state))
  mngr.wait_until_finished()
  finished = time.perf_counter() - start
  extra = peak_rss_bytes() - before
  mngr.close()
  return state, extra, blocked, finished


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/voc.py")
  parser.add_argument("--set", action="append", default=[],
                      help="config overrides FIELD=VALUE, e.g. model.backbone=resnet50")
  parser.add_argument("--write_mib", default="0,64",
                      help="config.checkpoint_write_mib values, comma-separated")
  parser.add_argument("--background", default="0,1",
                      help="0 (inline), 1 (in the background), or 0,1")
  parser.add_argument("--rounds", type=int, default=1, help="saves per variant (median)")
  parser.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  apply_overrides(config, " ".join(args.set))   # items separated by spaces
  mibs = [int(v) for v in args.write_mib.split(",")]
  modes = [bool(int(v)) for v in args.background.split(",")]

  _, _, abstract, _ = build.abstract_training(config, config.data.num_classes)
  state = random_state(abstract)
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(state))
  negate = jax.jit(lambda s: jax.tree.map(lambda a: -a, s), donate_argnums=0)
  state = jax.block_until_ready(negate(state))
  root = args.dir or tempfile.mkdtemp(prefix="checkpoint_save_")
  limits = {mib: checkpoint.write_limit(abstract, mib) for mib in mibs}
  state = measure(state, negate, os.path.join(root, "warmup"), modes[0], limits[mibs[-1]])[0]

  rows = []
  for background in modes:
    for mib, limit in limits.items():
      results = []
      for r in range(args.rounds):
        state, *result = measure(state, negate, os.path.join(root, f"{int(background)}_{mib}_{r}"),
                                 background, limit)
        results.append(result)
      extra, blocked, finished = np.median(np.asarray(results), axis=0)
      rows.append((("background" if background else "inline"),
                   "none" if limit is None else f"{limit / 2**20:.0f} MiB",
                   extra / 2**30, blocked, finished))

  print(f"\n## one checkpoint save: {args.config} {' '.join(args.set)}\n")
  print(f"machine: {cpu_model()}; devices: {jax.devices()[0].platform} x{jax.device_count()}; "
        f"allocator {allocator.active() or 'system'}; state {nbytes / 2**30:.3f} GiB in "
        f"{len(jax.tree.leaves(state))} arrays (largest {largest / 2**20:.1f} MiB), random "
        f"values; orbax {ocp.__version__}; median of {args.rounds} save(s) per row\n")
  print("| save | write limit | extra memory, GiB | save() held training, s "
        "| until finished, s |")
  print("|---|---|---|---|---|")
  for mode, limit, extra, blocked, finished in rows:
    print(f"| {mode} | {limit} | {extra:.3f} | {blocked:.2f} | {finished:.2f} |")
  return rows


if __name__ == "__main__":
  main()
