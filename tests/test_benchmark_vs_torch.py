"""benchmarks/vs_torch.py end to end on a tiny model: the torch worker, a JAX
row per XLA_FLAGS variant, the ratio column."""
import os
import re
import subprocess
import sys

import pytest

from conftest import load_benchmark

pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_FLAG = "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+dot"


def test_vs_torch_prints_a_row_per_xla_flags_variant():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "vs_torch.py"), "--backbone=tiny",
       "--width=8", "--size=33", "--batch=2", "--rounds=2", "--warmup=1", "--threads=1",
       "--dtypes=float32", f"--xla_flags=|{OLD_FLAG}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  timing, stages = out.stdout.split("resident set by stage")
  rows = [line for line in timing.splitlines() if line.startswith("| torch")
          or line.startswith("| JAX")]
  assert [row.split(" | ")[0] for row in rows] == [
      "| torch float32", "| JAX float32", f"| JAX float32, XLA_FLAGS `{OLD_FLAG}`"]
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
  assert list(stage_rows) == ["torch float32", "JAX float32",
                              f"JAX float32, XLA_FLAGS `{OLD_FLAG}`"]
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


def test_paired_ratios_pair_each_round():
  """The per-round ratio divides each JAX step by the torch step of its own
  round: a machine that slows down mid-run slows both alike, and the ratio
  of the medians would not show it."""
  vs_torch = load_benchmark("vs_torch")
  torch_times = [1.0, 2.0, 4.0]
  assert vs_torch.paired_ratios([0.9, 1.8, 3.6], torch_times) == "0.90 (0.90-0.90)"
  assert vs_torch.paired_ratios([1.1, 1.8, 4.0], torch_times) == "1.00 (0.90-1.10)"
  assert vs_torch.paired_ratios([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]) == "0.75 (0.50-1.00)"
