"""Shared test helpers: tiny configs and paths."""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache for the whole session, shared with the main.py
# subprocesses that the end-to-end tests start: the tiny models' steps and
# initialisers (threefry-heavy, ~30 s of compile on 2 cores) are compiled once
# per session instead of once per test. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="advsemiseg_test_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_config():
  """The demo's quick config (tiny model, 64x64 scenes), unlocked for edits."""
  from advsemiseg_jax.config import load_config
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  return config


def load_benchmark(name: str):
  """``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a
  package the tests import)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def hlo_instructions(compiled) -> int:
  """HLO instructions of a compiled jax function (fused computations'
  included): what the executable's in-memory size grows with."""
  return sum(" = " in line for line in compiled.as_text().splitlines())
