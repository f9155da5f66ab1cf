"""Shared test helpers: tiny configs and paths."""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_config():
  """The demo's quick config (tiny model, 64x64 scenes), unlocked for edits."""
  from advsemiseg_jax.config import load_config
  config = load_config(str(ROOT / "configs/demo.py:quick"))
  return config
