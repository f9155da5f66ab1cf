"""What the benchmarks print about the machine they ran on (no jax import,
so a parent process that only orchestrates workers stays light)."""
import os
import platform
import resource


def cpu_model() -> str:
  """The CPU's model name and core count, e.g. "Intel(R) Xeon(R) ..., 2 cores"."""
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores"


def max_rss_bytes() -> int:
  """This process's maximum resident set size so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
