"""benchmarks/vs_torch.py end to end on a tiny model: the torch worker, a JAX
row per XLA_FLAGS variant with --set's overrides, the ratio column."""
import argparse
import os
import re
import subprocess
import sys

import pytest

from conftest import load_benchmark

pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_FLAG = "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+dot"
SET = "model.bn_backward=written"


def test_vs_torch_prints_a_row_per_xla_flags_variant():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"), "--backbone=tiny",
       "--width=8", "--size=33", "--batch=2", "--rounds=2", "--warmup=1", "--threads=1",
       "--dtypes=float32", f"--xla_flags=|{OLD_FLAG}", f"--set={SET}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  timing, stages = out.stdout.split("resident set by stage")
  rows = [line for line in timing.splitlines() if line.startswith("| torch")
          or line.startswith("| JAX")]
  assert [row.split(" | ")[0] for row in rows] == [
      "| torch float32", f"| JAX float32, `{SET}`",
      f"| JAX float32, XLA_FLAGS `{OLD_FLAG}`, `{SET}`"]
  for row in rows:
    median, spread, ratio, per_round = row.split(" | ")[1:5]
    assert float(median) > 0 and re.fullmatch(r"[\d.]+-[\d.]+", spread)
    assert float(ratio) > 0
    if row.startswith("| JAX"):
      # Each round's JAX step over that round's torch step: median (min-max).
      match = re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", per_round)
      assert match, per_round
      low, mid, high = float(match[2]), float(match[1]), float(match[3])
      assert 0 < low <= mid <= high
  assert rows[0].split(" | ")[3:5] == ["1.00", "1.00"]
  # The resident set by stage: torch has no compiled step; every reading > 0.
  stage_rows = {row.split(" | ")[0][2:]: row.strip(" |").split(" | ")[1:]
                for row in stages.splitlines() if row.startswith("| torch") or row.startswith("| JAX")}
  assert list(stage_rows) == ["torch float32", f"JAX float32, `{SET}`",
                              f"JAX float32, XLA_FLAGS `{OLD_FLAG}`, `{SET}`"]
  # Columns: libraries, step compiled (JAX compiles before building its
  # state, as main.py does), state built.
  assert stage_rows["torch float32"][1] == "-"
  for name, cells in stage_rows.items():
    values = [float(c) for c in cells if c != "-"]
    assert len(values) == (3 if name == "torch float32" else 4), (name, cells)
    assert all(v > 0 for v in values), (name, cells)


def test_vs_torch_rejects_an_unknown_sequential_passes_value_at_once():
  """--sequential_passes takes auto, 0 and 1 (comma-separated): anything else
  fails before a worker starts, naming the value."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"),
       "--sequential_passes=0,yes"], capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert out.returncode == 2
  assert "'yes' is none of auto, 0, 1" in out.stderr


def test_vs_torch_rejects_a_bad_set_at_once():
  """A --set field the config lacks, or a value that does not parse, fails
  before a worker starts, naming it."""
  for bad, message in (("model.nope=1", "the config has no field 'model.nope'"),
                       ("model.width=wide", "'model.width=wide': invalid literal")):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"), "--set=",
         f"--set={bad}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr


def test_jax_worker_config_takes_its_flags_then_set():
  """The JAX worker's config: the authors' work (voc_reference), its flags,
  then --set's overrides, which win; L_semi on from step 0."""
  vs_torch = load_benchmark("vs_torch")
  args = argparse.Namespace(backbone="tiny", width=8, dtype="bfloat16", conv_impl="xla",
                            sequential_passes="1", remat_stages="34",
                            set="model.bn_backward=written optim.sequential_passes=false")
  config = vs_torch.jax_config(args)
  assert (config.model.backbone, config.model.width, config.model.aspp_branches) == ("tiny", 8, 2)
  assert (config.model.compute_dtype, config.model.conv_impl) == ("bfloat16", "xla")
  assert tuple(config.model.remat_stages) == (3, 4)
  assert config.model.bn_backward == "written"
  assert config.optim.sequential_passes is False
  assert config.loss.semi_start == 0
  args.set = ""
  assert vs_torch.jax_config(args).optim.sequential_passes is True


def test_paired_ratios_pair_each_round():
  """The per-round ratio divides each JAX step by the torch step of its own
  round: a machine that slows down mid-run slows both alike, and the ratio
  of the medians would not show it."""
  vs_torch = load_benchmark("vs_torch")
  torch_times = [1.0, 2.0, 4.0]
  assert vs_torch.paired_ratios([0.9, 1.8, 3.6], torch_times) == "0.90 (0.90-0.90)"
  assert vs_torch.paired_ratios([1.1, 1.8, 4.0], torch_times) == "1.00 (0.90-1.10)"
  assert vs_torch.paired_ratios([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]) == "0.75 (0.50-1.00)"
