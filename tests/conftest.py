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

# The suite checks values, not speed: XLA compiles the tests' programs with
# LLVM's optimisations off. The HLO (what the tests' memory plans and values
# come from) is the same; the tiny models' train steps, most of the suite's
# time, compile 2-2.5x faster (demo.py:quick's step: 15-19 s -> 7-9 s) and
# run about 3x slower (0.03 -> 0.08 s). ADVSEMISEG_TEST_LLVM_OPT=1, or these
# flags' names in XLA_FLAGS, keep XLA's defaults.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                          "--xla_llvm_disable_expensive_passes=true")
# XLA's own values of those flags, as compiler options: for a test that
# compares values with a compile at XLA's defaults (what a user runs).
XLA_LLVM_DEFAULTS = {"xla_backend_optimization_level": 3,
                     "xla_llvm_disable_expensive_passes": False}


def xla_flags(flags: str = "") -> str:
  """``flags`` plus the suite's compile flags that it does not name: the
  ``XLA_FLAGS`` for a test's subprocess that sets flags of its own."""
  if os.environ.get("ADVSEMISEG_TEST_LLVM_OPT") == "1":
    return flags
  from advsemiseg_jax.parallel import merged_xla_flags   # After the cache's variables.
  return merged_xla_flags(flags, FAST_COMPILE_XLA_FLAGS)


os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
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
