"""Where a compiled step's time goes: a jax.profiler trace summed per op kind.

  from benchmarks import op_profile
  table = op_profile.profile(compiled, args, steps=3)   # a compiled jax function
  print(op_profile.format_table(table))

Traces ``steps`` calls of ``compiled`` with ``jax.profiler``, reads the trace
back with ``jax.profiler.ProfileData`` (no TensorBoard needed) and attributes
every event that carries an ``hlo_op`` of the step's HLO module (GPU kernels
on the device plane; XLA:CPU thunks on the host plane) to that instruction of
``compiled.as_text()``. Instructions are grouped by what they do: the
custom-call target (cuDNN convolutions by direction, cuBLAS matrix products),
a fusion by its kind and by whether it holds a convolution, a matrix
product or a reduction, else the opcode. The table says how much of the
step's wall time some op was running ("busy": the union of the events'
intervals, against the step timed without the profiler when it is given),
so a low busy share points at launch overhead or host work, not at any
kernel. On a GPU, XLA replays runs of kernels as CUDA graphs (command
buffers), which the trace shows as one event each; run with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see their kernels. On a
CPU, XLA's own convolutions (``convolution`` rows; parallel.CPU_XLA_FLAGS
sends every convolution there) run asynchronously on Eigen's threads, and
their events end before the work does: those rows, and the busy share,
under-count them (with YNNPACK's convolutions ops ran during 91% of the 161
step, with XLA's 74%, while the step got faster).
"""
import collections
import glob
import os
import re
import tempfile
import time

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<rest>.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) .*\{$")


def parse_hlo(text: str):
  """{instruction name: (opcode, result type, attributes text)} and
  {computation name: set of its opcodes} of an HLO module's text."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    if not line.startswith(" "):
      match = _COMPUTATION.match(line)
      current = computations.setdefault(match["name"], set()) if match else None
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    opcode = _OPCODE.search(" " + match["rest"].split(" metadata=")[0])
    if not opcode:
      continue
    rest = match["rest"]
    instructions[match["name"]] = (opcode.group(1), rest[:opcode.start()].strip(), rest)
    if current is not None:
      current.add(opcode.group(1))
  return instructions, computations


def _attribute(rest: str, key: str) -> str:
  match = re.search(key + r'=%?"?([\w.\-$]+)', rest)
  return match.group(1) if match else ""


def category(name: str, instructions, computations) -> str:
  """What the instruction ``name`` does, in a few words."""
  if name.startswith("kernel "):
    return "kernels naming no HLO op"
  if name.startswith("command_buffer"):
    # XLA:GPU replays runs of kernels as CUDA graphs, one event each.
    return "command buffers (XLA_FLAGS=--xla_gpu_enable_command_buffer= splits them)"
  if name not in instructions:
    return "(not in the module: " + re.sub(r"[.\d]+$", "", name) + ")"
  opcode, _, rest = instructions[name]
  if opcode == "custom-call":
    return "custom-call " + _attribute(rest, "custom_call_target")
  if opcode != "fusion":
    return opcode
  body = computations.get(_attribute(rest, "calls"), set())
  holds = next((op for op in ("convolution", "dot", "reduce", "scatter", "transpose")
                if op in body), "elementwise")
  kind = re.search(r'"kind":"([^"]+)"', rest)
  return f"fusion {kind.group(1) if kind else _attribute(rest, 'kind')}: {holds}"


def _op_events(data, module: str):
  """(hlo_op, start_ns, duration_ns) of the events of ``module``: on the
  device planes if there are any (a kernel that names no HLO op is named
  "kernel <its name>"), else on the host's XLA threads."""
  planes = [p for p in data.planes if p.name.startswith("/device:")]
  on_device = any(True for p in planes for line in p.lines for _ in line.events)
  if not on_device:
    planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
  for plane in planes:
    for line in plane.lines:
      if line.name == "python" or "XLA Modules" in line.name:
        continue
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op") or (on_device and "kernel " + event.name[:50])
        if op and str(stats.get("hlo_module", module)).startswith(module):
          yield str(op), event.start_ns, event.duration_ns


def _union_ns(intervals) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def profile(compiled, args, steps: int = 3, logdir: str = ""):
  """Runs ``compiled(*args)`` ``steps`` times under the profiler (feeding
  the first output back as the first argument, as a train step's state is)
  and returns the summary as a dict (see ``format_table``)."""
  text = compiled.as_text()
  module = text.split()[1].rstrip(",")
  instructions, computations = parse_hlo(text)
  logdir = logdir or tempfile.mkdtemp(prefix="op_profile_")
  jax.block_until_ready(args)
  begin = time.perf_counter()
  with jax.profiler.trace(logdir):
    for _ in range(steps):
      out = compiled(*args)
      args = (out[0], *args[1:])
      jax.block_until_ready(out)
  wall = (time.perf_counter() - begin) / steps
  path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)
  data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.defaultdict(lambda: [0.0, 0])
  intervals = []
  for op, start, duration in _op_events(data, module):
    per_op[op][0] += duration
    per_op[op][1] += 1
    intervals.append((start, start + duration))
  per_category = collections.defaultdict(lambda: [0.0, 0])
  for op, (ns, count) in per_op.items():
    entry = per_category[category(op, instructions, computations)]
    entry[0] += ns
    entry[1] += count
  top = sorted(per_op.items(), key=lambda kv: -kv[1][0])
  return dict(
      steps=steps, wall_s=wall, module=module, events=len(intervals),
      op_s=sum(ns for ns, _ in per_op.values()) / steps / 1e9,
      busy_s=_union_ns(intervals) / steps / 1e9,
      categories=sorted(((name, ns / steps / 1e9, count / steps)
                         for name, (ns, count) in per_category.items()),
                        key=lambda row: -row[1]),
      top=[(op, category(op, instructions, computations), ns / steps / 1e9,
            instructions.get(op, ("", "?", ""))[1][:60])
           for op, (ns, _) in top[:15]])


def format_table(summary, step_s: float = 0.0) -> str:
  """The summary as markdown: totals, time per op kind, the 15 longest ops.
  ``step_s``: the step's time without the profiler, to set the busy time
  against (else the profiled steps' wall time, which the profiler inflates)."""
  s = summary
  wall = s["wall_s"]
  against = (f"{s['busy_s'] / step_s:.0%} of the {step_s * 1e3:.1f} ms step timed without "
             "the profiler" if step_s else f"{s['busy_s'] / wall:.0%} of the profiled step")
  lines = [
      f"profiled {s['steps']} steps of {s['module']}: {wall * 1e3:.1f} ms per step under the "
      f"profiler; {s['events'] / s['steps']:.0f} op events per step; op time "
      f"{s['op_s'] * 1e3:.1f} ms per step; some op running {s['busy_s'] * 1e3:.1f} ms "
      f"per step ({against})", "",
      "| op kind | ms per step | share of op time | events per step |", "|---|---|---|---|"]
  for name, seconds, count in s["categories"]:
    lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / s['op_s']:.1%} | {count:.0f} |")
  lines += ["", "| longest ops | kind | ms per step | result |", "|---|---|---|---|"]
  for op, kind, seconds, shape in s["top"]:
    lines.append(f"| {op} | {kind} | {seconds * 1e3:.2f} | `{shape}` |")
  return "\n".join(lines)
