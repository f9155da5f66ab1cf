"""benchmarks/checkpoint_save.py on a tiny model: the state it saves has the
config's shapes and random values, and it prints a row per variant."""
import jax
import numpy as np
from conftest import load_benchmark

from advsemiseg_jax import build
from advsemiseg_jax.config import apply_overrides, load_config

TINY = ["model.backbone=tiny", "model.width=8", "model.disc_width=8"]


def test_random_state_has_the_train_states_shapes_and_no_repeats():
  bench = load_benchmark("checkpoint_save")
  config = load_config("configs/demo.py")
  apply_overrides(config, " ".join(TINY))
  _, _, abstract, _ = build.abstract_training(config, config.data.num_classes)
  state = bench.random_state(abstract)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  assert got == jax.tree.map(lambda s: (s.shape, s.dtype), abstract)
  head = state.g_params["layer5"]
  kernel = np.asarray(head["conv2d_list_0"]["kernel"])
  assert kernel.std() > 0.5 and len(np.unique(kernel)) > 0.99 * kernel.size  # incompressible
  assert not np.array_equal(kernel, np.asarray(head["conv2d_list_1"]["kernel"]))
  assert int(state.step) == 0


def test_prints_a_row_per_variant(tmp_path, capsys):
  bench = load_benchmark("checkpoint_save")
  rows = bench.main(["--config=configs/demo.py", *[f"--set={s}" for s in TINY],
                     "--write_mib=0,1", "--background=0,1", f"--dir={tmp_path}"])
  assert [(mode, limit) for mode, limit, *_ in rows] == [
      ("inline", "none"), ("inline", "1 MiB"), ("background", "none"), ("background", "1 MiB")]
  assert all(blocked >= 0 and finished >= blocked for *_, blocked, finished in rows)
  out = capsys.readouterr().out
  assert "| inline | 1 MiB |" in out and "random values" in out
  assert (tmp_path / "1_1_0").is_dir()   # the last variant's checkpoint
