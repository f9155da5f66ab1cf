"""Start-up validation through main.py: one line naming the key, a non-zero
exit, within seconds (nothing compiled, no data read). tests/test_train.py
covers unknown keys and variants."""
import os
import subprocess
import sys

import pytest

from advsemiseg_jax.config import base_config
from advsemiseg_jax.validate import ConfigError, validate_config

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(log, workdir, *overrides, env=None):
  """main.py on the quick config with ``overrides``; stderr to ``log``."""
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/demo.py:quick",
       f"--workdir={workdir}", *overrides], stdout=subprocess.DEVNULL,
      stderr=open(log, "w"), cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))


def _wait(proc):
  """(exit status, CPU seconds) of a child: CPU time, not wall time, since
  the children run side by side on a shared machine."""
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_utime + usage.ru_stime


def test_main_rejects_each_bad_value_with_one_line_naming_the_key(tmp_path):
  (tmp_path / "a_file").write_text("")
  cases = {  # name: (overrides, env, the line main.py must print)
      "crop": (["--config.data.crop_size=(20, 20)"], None,
               "config error: data.crop_size=(20, 20): both sides must be >= 32"),
      "devices": (["--config.data.batch_size=3"],
                  {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")},
                  "config error: data.batch_size=3 is not divisible by the 2 devices"),
      "classes": (["--config.data.name=voc", f"--config.data.root={tmp_path}",
                   "--config.data.num_classes=5"], None,
                  "config error: data.num_classes=5 but dataset 'voc' has 21 classes"),
      "policy": (["--config.nonfinite_policy=ignore"], None,
                 "config error: nonfinite_policy must be one of ('stop', 'skip')"),
      "semi_start": (["--config.loss.semi_start=31"], None,
                     "config error: loss.semi_start=31 is beyond num_steps=30"),
      "t_semi": (["--config.loss.t_semi=1.5"], None,
                 "config error: loss.t_semi must be in [0, 1], got 1.5"),
      "fraction": (["--config.data.labeled_fraction=0"], None,
                   "config error: data.labeled_fraction must be in (0, 1], got 0.0"),
      "lambda": (["--config.loss.lambda_adv=-1"], None,
                 "config error: loss.lambda_adv must be >= 0, got -1.0"),
  }
  cases["workdir"] = ([], None, f"config error: workdir '{tmp_path}/a_file/run' "
                                "cannot be written")
  procs = {}
  for name, (overrides, env, _) in cases.items():
    workdir = tmp_path / "a_file" / "run" if name == "workdir" else tmp_path / name
    procs[name] = _start(tmp_path / f"{name}.log", workdir, *overrides, env=env)
  for name, proc in procs.items():
    code, cpu_seconds = _wait(proc)
    err = (tmp_path / f"{name}.log").read_text()
    assert code == 1, (name, err[-2000:])
    lines = [l for l in err.splitlines() if l.startswith("config error")]
    assert len(lines) == 1 and lines[0].startswith(cases[name][2]), (name, err[-2000:])
    assert "Traceback" not in err, (name, err[-2000:])
    # Imports and the checks only (alone: about 10 s of wall time).
    assert cpu_seconds < 30, (name, cpu_seconds)
    assert not os.path.exists(tmp_path / name / "checkpoints"), name


@pytest.mark.parametrize("field,value,message", [
    ("data.crop_size", (64.5, 64), r"data.crop_size=\(64.5, 64\) must be \(height, width\)"),
    ("data.crop_size", (64,), r"must be \(height, width\)"),
    ("data.num_classes", 0, "data.num_classes must be >= 1"),
    ("nonfinite_policy", "warn", "nonfinite_policy must be one of"),
    ("max_to_keep", 0, "max_to_keep must be >= 1"),
    ("checkpoint_write_mib", -1, "checkpoint_write_mib must be >= 0"),
    ("loss.t_semi", -0.1, r"loss.t_semi must be in \[0, 1\]"),
    ("loss.lambda_semi_adv", -0.5, "loss.lambda_semi_adv must be >= 0"),
    ("data.labeled_fraction", 1.5, r"data.labeled_fraction must be in \(0, 1\]"),
])
def test_validate_names_the_field(field, value, message):
  config = base_config()
  config.data.num_classes = 4
  section, _, key = field.rpartition(".")
  setattr(config[section] if section else config, key, value)
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_cityscapes_class_count_checked_before_reading(tmp_path):
  config = base_config()
  config.data.name, config.data.root, config.data.num_classes = (
      "cityscapes", str(tmp_path / "missing"), 21)
  with pytest.raises(ConfigError, match="dataset 'cityscapes' has 19 classes"):
    validate_config(config)
