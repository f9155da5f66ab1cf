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


def reset_peak_rss() -> bool:
  """Resets this process's resident-set high-water mark (Linux,
  ``/proc/self/clear_refs``), so that ``peak_rss_bytes`` measures from here
  on: e.g. the training steps without the compilation before them. The
  kernel's ``ru_maxrss`` is reset with it: read the peak before resetting."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _status_bytes(field: str):
  """A memory field of ``/proc/self/status`` (e.g. ``VmRSS``) in bytes, or
  None without /proc."""
  try:
    with open("/proc/self/status") as f:
      line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
  except (OSError, StopIteration):
    return None


def peak_rss_bytes() -> int:
  """The resident-set high-water mark since the last ``reset_peak_rss``
  (``VmHWM``); without /proc, the maximum since the process started."""
  peak = _status_bytes("VmHWM")
  return max_rss_bytes() if peak is None else peak


def rss_bytes() -> int:
  """This process's resident set size now (``VmRSS``); 0 without /proc."""
  return _status_bytes("VmRSS") or 0
