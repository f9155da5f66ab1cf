"""Runs the CPU trainer on tcmalloc when the system has it.

XLA:CPU allocates each step's temporaries as large blocks. glibc's malloc maps
such blocks fresh for every step and gives them back afterwards, so the
kernel faults the memory in again, page by page, on every step. On this
project's 2-core CPU that was 2.2 million page faults and 6-8 s of system time
per ResNet-101 step at 321x321, batch 2 (about 20% of the step), and 0.56
million at 161x161. tcmalloc keeps the freed memory and hands it back out: no
faults after the first step (docs/performance.md).

The allocator must be chosen before the process starts, so ``main.py`` (and
the benchmarks) call ``reexec_with_tcmalloc()`` first thing: if a tcmalloc
library is installed (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``)
and not already preloaded, the process replaces itself with the same command
line under ``LD_PRELOAD``. Without tcmalloc nothing changes.
``ADVSEMISEG_MALLOC=system`` keeps the system allocator;
``ADVSEMISEG_MALLOC=/path/to/lib.so`` preloads that library instead.
Does not import JAX (and must not: it runs before anything else).
"""
import os
import sys
from typing import Mapping, Optional

ENV_CHOICE = "ADVSEMISEG_MALLOC"
# Set in the replaced process, so that it never replaces itself again.
ENV_DONE = "ADVSEMISEG_MALLOC_REEXEC"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4",
                  "libtcmalloc_minimal.so", "libtcmalloc.so")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib", "/opt/conda/lib")


def find_tcmalloc(dirs=LIBRARY_DIRS, names=TCMALLOC_NAMES) -> Optional[str]:
  """The path of the first tcmalloc library found, or None."""
  for directory in dirs:
    for name in names:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def preload_env(environ: Mapping[str, str], library: Optional[str]) -> Optional[dict]:
  """The environment to re-run the process with, or None to run as it is.

  None when: not Linux, the user chose ``ADVSEMISEG_MALLOC=system``, no
  library was found, this process is already the re-run one, or
  ``LD_PRELOAD`` already names a tcmalloc or jemalloc (the user's choice).
  """
  choice = environ.get(ENV_CHOICE, "auto")
  if choice == "system" or not sys.platform.startswith("linux") or environ.get(ENV_DONE):
    return None
  if choice != "auto":
    library = choice
  preloaded = environ.get("LD_PRELOAD", "")
  if not library or active(preloaded) != "system":
    return None
  env = dict(environ)
  env["LD_PRELOAD"] = f"{library} {preloaded}".strip()
  env[ENV_DONE] = library
  return env


def reexec_with_tcmalloc(library: Optional[str] = None) -> None:
  """Replaces this process with the same command under ``LD_PRELOAD`` of
  ``library`` (default: ``find_tcmalloc()``) when ``preload_env`` says so.
  Returns (and the process goes on as it is) otherwise, or if the exec fails."""
  env = preload_env(os.environ, library or find_tcmalloc())
  if env is None:
    return
  argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv)[1:])
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
  except OSError as exc:  # pragma: no cover (exec of our own interpreter)
    print(f"advsemiseg_jax.allocator: could not re-run under {env['LD_PRELOAD']}: {exc}",
          file=sys.stderr)


def active(preloaded: Optional[str] = None) -> str:
  """The tcmalloc or jemalloc that ``preloaded`` (default: this process's
  ``LD_PRELOAD``) names, or "system"."""
  if preloaded is None:
    preloaded = os.environ.get("LD_PRELOAD", "")
  for part in preloaded.split():
    if "tcmalloc" in part or "jemalloc" in part:
      return part
  return "system"


def release_free_memory() -> str:
  """Hands the memory the allocator holds free back to the system, and says
  how: tcmalloc's ``MallocExtension_ReleaseFreeMemory``, glibc's
  ``malloc_trim(0)``, or "none" (neither found).

  tcmalloc keeps all it frees, so without this the memory XLA used to compile
  the step (and Flax to initialise) stays in the process for the whole run.
  Called once after the first training step; costs tens of milliseconds.
  """
  import ctypes
  process = ctypes.CDLL(None)
  release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
  if release is not None:
    release()
    return "MallocExtension_ReleaseFreeMemory"
  trim = getattr(process, "malloc_trim", None)
  if trim is not None:
    trim(ctypes.c_size_t(0))
    return "malloc_trim"
  return "none"
