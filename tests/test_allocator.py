"""The tcmalloc re-run of main.py and the benchmarks (advsemiseg_jax/allocator.py)."""
import json
import os
import subprocess
import sys

import pytest

from advsemiseg_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_tcmalloc_takes_the_first_library_found(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "libtcmalloc.so.4").write_bytes(b"")
  dirs = (str(tmp_path / "a"), str(tmp_path / "b"))
  assert allocator.find_tcmalloc(dirs) == str(tmp_path / "b" / "libtcmalloc.so.4")
  assert allocator.find_tcmalloc((str(tmp_path / "a"),)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_preload_env_decisions():
  lib = "/usr/lib/libtcmalloc_minimal.so.4"
  env = allocator.preload_env({"LD_PRELOAD": "/x/libfoo.so", "A": "1"}, lib)
  assert env["LD_PRELOAD"] == f"{lib} /x/libfoo.so" and env["A"] == "1"
  assert env[allocator.ENV_DONE] == lib
  assert allocator.preload_env({}, None) is None                          # none installed
  assert allocator.preload_env({allocator.ENV_CHOICE: "system"}, lib) is None
  assert allocator.preload_env({allocator.ENV_DONE: lib}, lib) is None      # no loop
  assert allocator.preload_env({"LD_PRELOAD": "/y/libjemalloc.so.2"}, lib) is None
  chosen = allocator.preload_env({allocator.ENV_CHOICE: "/z/libmine.so"}, None)
  assert chosen["LD_PRELOAD"] == "/z/libmine.so"


_CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
from advsemiseg_jax import allocator
print(json.dumps({{"pid": os.getpid(), "argv": sys.argv[1:],
                  "preload": os.environ.get("LD_PRELOAD", "")}}), flush=True)
allocator.reexec_with_tcmalloc(library="libm.so.6")
print(json.dumps({{"active": allocator.active(), "argv": sys.argv[1:]}}), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize("choice", ["auto", "system"])
def test_reexec_keeps_pid_and_arguments_and_runs_once(tmp_path, choice):
  """libm stands in for tcmalloc (every Linux has it): the process re-runs
  itself once, same pid, same arguments, with the library preloaded; with
  ADVSEMISEG_MALLOC=system it runs once, as it is."""
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(root=ROOT))
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", allocator.ENV_DONE)}
  env[allocator.ENV_CHOICE] = choice
  out = subprocess.run([sys.executable, str(script), "--flag=1", "two words"], env=env,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  lines = [json.loads(line) for line in out.splitlines()]
  starts = [line for line in lines if "pid" in line]
  assert all(line["argv"] == ["--flag=1", "two words"] for line in lines)
  if choice == "system":
    assert len(starts) == 1 and lines[-1]["active"] == "system"
    return
  assert len(starts) == 2 and starts[0]["pid"] == starts[1]["pid"]
  assert starts[0]["preload"] == "" and starts[1]["preload"].startswith("libm.so.6")
  assert len(lines) == 3   # the first run never got past the exec


_HOLD_AND_RELEASE = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from advsemiseg_jax import allocator
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
blocks = [np.ones(2**20, np.uint8) for _ in range(256)]   # 256 MiB in 1 MiB blocks
del blocks
held = rss()
how = allocator.release_free_memory()
print(json.dumps({{"before": before, "held": held, "after": rss(), "how": how}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and LD_PRELOAD")
@pytest.mark.parametrize("library", ["tcmalloc", "system"])
def test_release_free_memory_hands_back_what_the_allocator_holds(tmp_path, library):
  """256 MiB allocated in 1 MiB blocks and freed: tcmalloc keeps it until
  release_free_memory(); glibc gets malloc_trim (and has given the blocks
  back already). Either way the resident set ends near where it began."""
  preload = allocator.find_tcmalloc() if library == "tcmalloc" else ""
  if library == "tcmalloc" and not preload:
    pytest.skip("no tcmalloc installed (apt install libtcmalloc-minimal4)")
  script = tmp_path / "hold.py"
  script.write_text(_HOLD_AND_RELEASE.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  env["LD_PRELOAD"] = preload
  out = json.loads(subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                                  text=True, timeout=60, check=True).stdout)
  mib = 2**20
  if library == "tcmalloc":
    assert out["how"] == "MallocExtension_ReleaseFreeMemory"
    assert out["held"] - out["before"] > 200 * mib, out      # tcmalloc kept the blocks
  else:
    assert out["how"] == "malloc_trim"
  assert out["after"] - out["before"] < 64 * mib, out
