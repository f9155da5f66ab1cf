"""The same training iteration in our JAX step and in torch, side by side.

  python benchmarks/vs_torch.py                         # ResNet-101, 161x161, batch 2
  python benchmarks/vs_torch.py --size=321 --rounds=5
  python benchmarks/vs_torch.py --size=321 --dtypes=float32 --sequential_passes=0,1 --remat_stages=0,1234
  python benchmarks/vs_torch.py --size=161 --set= --set=model.bn_backward=written   # A/B any config field
  python benchmarks/vs_torch.py --backbone=tiny --width=8 --size=65 --rounds=3   # smoke run
  python benchmarks/vs_torch.py --size=321 --batch=10 --xla_cpu_tuning=0   # one GPU

torch runs tests/torch_reference.py's re-implementation of the authors'
iteration (unlabeled batch with L_semi_adv + L_semi, labeled batch with L_ce
+ L_adv, D on fake and real; ASPP with their early return), JAX runs
configs/voc_reference.py (the same work: two ASPP branches, semi on from step
0). Each framework lives in its own long-lived worker process; the parent
alternates single steps between them (torch, JAX, torch, JAX, ...), so load
from other processes on the machine falls on both alike, and the ratio of the
medians is more robust than either time. A second ratio pairs the steps of
each round (each JAX step over the torch step of its round) and gives the
median and range of those per-round ratios: a machine whose speed drifts
during the run moves both steps of a round alike. Each worker reports its own maximum
resident set size. One table: machine, load average, both medians and
spreads, the ratio JAX / torch, peak memory, per JAX variant asked for
(each of ``--dtypes``, ``--sequential_passes``, ``--remat_stages``,
``--xla_flags`` and ``--set`` multiplies the rows);
on a CPU a second one, each worker's resident set by stage (libraries
imported, state built, step compiled, peak during the steps).

On a GPU machine (``--device=auto`` finds it) torch runs on the GPU with
cudnn.benchmark on, as the authors' train.py sets it, and copies each batch
to the GPU inside the iteration, as their loop does; JAX runs on the GPU
too, without preallocating, so that both fit on the card. A step is timed
until the device is done. Device memory comes in two columns: each
allocator's peak over the whole process, which includes the convolution
autotuners' scratch space (cudnn.benchmark's trials in torch's first step,
XLA's while compiling), and the peak of the steps: torch's allocator peak
from its second step on, and XLA's plan for the compiled step (arguments,
temporaries and outputs), which is what the JAX steps hold.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NUM_CLASSES = 21

from advsemiseg_jax import allocator  # noqa: E402
from benchmarks.machine import cpu_model, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def resident(stages: dict, name: str) -> dict:
  """Records in ``stages`` the resident set once the allocator has handed
  back what it holds free (``allocator.release_free_memory``)."""
  allocator.release_free_memory()
  stages[name] = rss_bytes()
  return stages


def torch_worker(args):
  """Reads "step" lines, answers each with the step's seconds (JSON)."""
  import warnings
  import torch
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch_reference as tr
  stages = resident({}, "libraries")
  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  device = torch_device(args.device)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True   # The authors' train.py.
  blocks = {"resnet101": (3, 4, 23, 3), "resnet50": (3, 4, 6, 3), "tiny": (1, 1, 1, 1)}
  model = tr.ResNetDeepLab(NUM_CLASSES, blocks[args.backbone], args.width,
                           early_return=True).to(device)
  model_d = tr.FCDiscriminator(NUM_CLASSES, 64).to(device)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt_g, opt_d = tr.make_optimizers(model, model_d, 2.5e-4, 1e-4)
  cfg = dict(lr_g=2.5e-4, lr_d=1e-4, num_steps=20000, power=0.9, lambda_adv=0.01,
             lambda_semi_adv=0.001, lambda_semi=0.1, t_semi=0.2, semi_start=0,
             semi_start_adv=0, num_classes=NUM_CLASSES)
  batch = make_batch(args.batch, args.size)
  step = 0
  resident(stages, "state")   # Frees as the JAX worker (and main.py) do.
  before = peak_rss_bytes()
  reset_peak_rss()
  whole_peak = 0
  for line in sys.stdin:
    start = time.perf_counter()
    tr.train_iteration(model, model_d, opt_g, opt_d, batch, step, cfg)
    if device == "cuda":
      torch.cuda.synchronize()
    step += 1
    if device != "cuda":
      answer(start, before, stages=stages)
      continue
    steps_peak = torch.cuda.max_memory_allocated()
    whole_peak = max(whole_peak, steps_peak)
    answer(start, before, (whole_peak, steps_peak if step > 1 else None),
           torch.cuda.get_device_name())
    if step == 1:   # The first step's peak holds cudnn.benchmark's trials.
      torch.cuda.reset_peak_memory_stats()


def jax_worker(args):
  """As ``torch_worker``, for the JAX step (compiled before the first answer)."""
  from advsemiseg_jax import parallel
  parallel.prepare_cpu_backend(bool(args.xla_cpu_tuning))  # As main.py.
  import jax
  from benchmarks import train_step as ts
  from advsemiseg_jax import build
  jax.devices()   # The backend started: part of the libraries' cost.
  stages = resident({}, "libraries")
  config = jax_config(args)
  mesh = parallel.make_mesh(jax.devices()[:1])
  # As main.py: the step compiled from the state's shapes, before the state
  # exists (build.abstract_training), then the state built.
  generator, discriminator, abstract, step_fn = build.abstract_training(config, NUM_CLASSES)
  batch = parallel.to_global(make_batch(args.batch, args.size), mesh)
  step = parallel.compile_train_step(parallel.jit_train_step(step_fn, mesh), abstract, batch)
  plan = ts.xla_plan_bytes(step)
  plan = None if math.isnan(plan) else plan   # JSON's null: "-" in the table
  device = jax.devices()[0]
  resident(stages, "compiled")   # What compiling freed goes (main.py does the same).
  state = build.initial_state(config, generator, discriminator, NUM_CLASSES)
  state = parallel.replicate_state(state, mesh)
  resident(stages, "state")
  before = peak_rss_bytes()
  reset_peak_rss()   # From here: the steps, without the compilation.
  for line in sys.stdin:
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if device.platform == "cpu":
      answer(start, before, stages=stages)
    else:
      answer(start, before, (device.memory_stats()["peak_bytes_in_use"], plan),
             device.device_kind)


def jax_config(args):
  """A JAX worker's config: configs/voc_reference.py (the authors' work: two
  ASPP branches), L_semi on from step 0, the model's size and the worker's
  dtype, conv_impl, sequential passes and remat stages from ``args``, then
  its ``--set`` overrides."""
  from advsemiseg_jax.config import apply_overrides, load_config
  config = load_config(os.path.join(ROOT, "configs/voc_reference.py"))
  config.model.backbone, config.model.width = args.backbone, args.width
  config.model.compute_dtype, config.model.conv_impl = args.dtype, args.conv_impl
  config.optim.sequential_passes = SEQUENTIAL_PASSES[args.sequential_passes][0]
  config.model.remat_stages = remat_stages(args.remat_stages)
  apply_overrides(config, args.set)
  config.loss.semi_start = 0
  return config


def torch_device(name: str) -> str:
  """``auto``: ``cuda`` where torch sees a GPU, else ``cpu``."""
  import torch
  if name == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return name


def answer(start, before_steps, device_peak=None, device=None, stages=None):
  """A worker's reply to "step": its seconds, the process's peak resident set
  (``before_steps``: the peak up to the first step, when the kernel's mark
  was reset), the peak since the steps began, on a GPU the device memory
  (whole process, steps; the latter None until known) and the device's
  name, and on a CPU the resident set by stage (``resident``)."""
  steps = peak_rss_bytes()
  print(json.dumps({"seconds": time.perf_counter() - start, "rss": max(before_steps, steps),
                    "step_rss": steps, "device_peak": device_peak, "device": device,
                    "stages": stages or {}}),
        flush=True)


def make_batch(batch, size):
  """The batch both frameworks train on (labels 5% ignored)."""
  import numpy as np
  rng = np.random.RandomState(0)

  def labels():
    lab = rng.randint(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)
    lab[rng.rand(batch, size, size) < 0.05] = 255
    return lab
  image = lambda: (rng.randn(batch, size, size, 3) * 50).astype(np.float32)
  return {"image": image(), "label": labels(), "unlabeled_image": image(),
          "gt_label": labels()}


class Worker:
  """A worker process driven one step at a time."""

  def __init__(self, kind, args, extra=(), xla_flags=""):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}",
           f"--backbone={args.backbone}", f"--width={args.width}", f"--size={args.size}",
           f"--batch={args.batch}", f"--threads={args.threads}",
           f"--xla_cpu_tuning={args.xla_cpu_tuning}", f"--device={args.device}", *extra]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")   # Share a GPU with torch.
    if xla_flags:   # Named flags win over parallel.CPU_XLA_FLAGS' of the same name.
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.times, self.rss, self.step_rss, self.device_peak, self.device = [], 0, 0, None, None
    self.stages = {}

  def step(self, record=True):
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.proc.args[2]} ended (status {self.proc.wait()})")
    answer = json.loads(line)
    if record:
      self.times.append(answer["seconds"])
    self.rss, self.step_rss = answer["rss"], answer["step_rss"]
    self.device_peak, self.device = answer["device_peak"], answer["device"]
    self.stages = answer["stages"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


# --sequential_passes: (optim.sequential_passes, what the row's name adds);
# auto is the config's default (None: on for a CPU).
SEQUENTIAL_PASSES = {"auto": (None, ""), "0": (False, ", fused passes"),
                     "1": (True, ", sequential passes")}


def remat_stages(digits: str):
  """``--remat_stages`` names stages by their digits: ``34`` is (3, 4), ``0``
  none."""
  return tuple(int(c) for c in digits if c != "0")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--worker", default="")
  parser.add_argument("--backbone", default="resnet101")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--size", type=int, default=161)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5, help="timed steps of each")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  parser.add_argument("--device", default="auto", help="torch's device: auto, cpu or cuda")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="JAX compute dtypes")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--conv_impl", default="dot", help="JAX model.conv_impl")
  parser.add_argument("--xla_cpu_tuning", type=int, default=1)
  parser.add_argument("--sequential_passes", default="auto",
                      help="JAX optim.sequential_passes: auto (the default: on for a CPU, "
                           "off elsewhere), 0, 1, or e.g. 0,1 for a row of each")
  parser.add_argument("--remat_stages", default="0",
                      help="JAX model.remat_stages as digits (0: none, 3: (3,), 1234: all), "
                           "comma-separated for a row of each")
  parser.add_argument("--set", action="append", default=None,
                      help="JAX config overrides, FIELD=VALUE separated by spaces (as "
                           "train_step.py's --set), e.g. 'model.bn_backward=written'; "
                           "repeat for a row of each (an empty one keeps the defaults)")
  parser.add_argument("--xla_flags", default="",
                      help="XLA_FLAGS added for the JAX workers ('|' between variants, a row "
                           "of each; an empty variant keeps the defaults), e.g. "
                           "'|--xla_cpu_experimental_ynn_fusion_type=+eltwise,+dot'")
  args = parser.parse_args()
  for seq in args.sequential_passes.split(","):
    if seq not in SEQUENTIAL_PASSES:
      parser.error(f"--sequential_passes: {seq!r} is none of {', '.join(SEQUENTIAL_PASSES)}")
  if not args.worker:  # Both workers inherit the allocator, as main.py's would.
    allocator.reexec_with_tcmalloc()
  if args.worker:
    args.set = args.set[0] if args.set else ""
  if args.worker == "torch":
    return torch_worker(args)
  if args.worker == "jax":
    return jax_worker(args)
  args.set = args.set or [""]
  check_overrides(parser, args.set)

  load_before = os.getloadavg()
  torch_w = Worker("torch", args)
  jax_ws = {(d, seq, rs, flags, sets): Worker(
      "jax", args, (f"--dtype={d}", f"--conv_impl={args.conv_impl}",
                    f"--sequential_passes={seq}", f"--remat_stages={rs}", f"--set={sets}"),
      flags)
            for d in args.dtypes.split(",") for seq in args.sequential_passes.split(",")
            for rs in args.remat_stages.split(",") for flags in args.xla_flags.split("|")
            for sets in args.set}
  workers = [torch_w, *jax_ws.values()]
  for _ in range(args.warmup):
    for w in workers:
      w.step(record=False)
  for _ in range(args.rounds):
    for w in workers:
      w.step()
  for w in workers:
    w.close()

  import numpy as np
  med = lambda w: float(np.median(w.times))
  spread = lambda w: f"{min(w.times):.3f}-{max(w.times):.3f}"
  print(f"\n## one training iteration, JAX vs torch: {args.backbone} (width {args.width}), "
        f"{args.size}x{args.size}, batch {args.batch}, semi on\n")
  print(f"machine: {cpu_model()}; load average before {load_before[0]:.2f}, "
        f"after {os.getloadavg()[0]:.2f}; allocator (both) {allocator.active()}; torch threads {args.threads or os.cpu_count()}; "
        f"JAX conv_impl={args.conv_impl}, XLA CPU flags {'on' if args.xla_cpu_tuning else 'off'}, "
        f"sequential passes where a row does not say: auto (on for a CPU); "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up; "
        f"devices: torch {torch_w.device or 'CPU'}, JAX "
        f"{', '.join(sorted({w.device or 'CPU' for w in jax_ws.values()}))}\n")
  on_gpu = any(w.device_peak for w in workers)
  gpu_gib = lambda w: " | ".join("-" if b is None else f"{b / 2**30:.2f}"
                                 for b in (w.device_peak or (None, None)))
  gib = lambda w: (f"{w.rss / 2**30:.2f} | {w.step_rss / 2**30:.2f}"
                   + (f" | {gpu_gib(w)}" if on_gpu else ""))
  gpu_columns = (" device peak GiB, whole process | device GiB, steps (torch: allocator "
                 "peak after step 1; JAX: XLA's plan) |") if on_gpu else ""
  print("| run | median s | min-max s | JAX / torch | per round: median (min-max) | "
        "peak RSS GiB, whole process | "
        f"peak RSS GiB, during the steps |{gpu_columns}\n|---|---|---|---|---|---|---|"
        + ("---|---|" if on_gpu else ""))
  print(f"| torch float32 | {med(torch_w):.3f} | {spread(torch_w)} | 1.00 | 1.00 | "
        f"{gib(torch_w)} |")
  rows = [("torch float32", torch_w)]
  for (dtype, seq, rs, flags, sets), w in jax_ws.items():
    name = f"JAX {dtype}" + SEQUENTIAL_PASSES[seq][1]
    if remat_stages(rs):
      name += f", remat stages {remat_stages(rs)}"
    if flags:
      name += f", XLA_FLAGS `{flags}`"
    if sets.strip():
      name += f", `{' '.join(sets.split())}`"
    rows.append((name, w))
    print(f"| {name} | {med(w):.3f} | {spread(w)} | {med(w) / med(torch_w):.2f} | "
          f"{paired_ratios(w.times, torch_w.times)} | {gib(w)} |")
  if any(w.stages for w in workers):
    print(stage_table(rows))


def check_overrides(parser, variants):
  """Fails at start-up, not in a worker once the torch one has started, on a
  ``--set`` whose field is not in the config or whose value does not parse."""
  from advsemiseg_jax.config import apply_overrides, load_config
  config = load_config(os.path.join(ROOT, "configs/voc_reference.py"))
  for sets in variants:
    try:
      apply_overrides(config.copy_and_resolve_references(), sets)
    except ValueError as error:
      parser.error(f"--set: {error}")


def paired_ratios(times, torch_times) -> str:
  """"median (min-max)" of ``times[i] / torch_times[i]``: each round's JAX step
  over the torch step of the same round."""
  ratios = [t / r for t, r in zip(times, torch_times)]
  return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


STAGES = (("libraries", "libraries imported"),
          ("compiled", "step compiled (JAX: from the state's shapes, before building it)"),
          ("state", "model, optimisers and batch built"))


def stage_table(rows) -> str:
  """Each worker's resident set by stage, with the allocator's free memory
  handed back before each reading, then its peak during the steps. torch's
  optimiser state and ``.grad`` tensors only exist from its first step on,
  so its "built" column holds its parameters alone."""
  head = " | ".join(label for _, label in STAGES)
  lines = ["", "resident set by stage, GiB (free memory handed back before each reading):",
           "", f"| run | {head} | peak during the steps |",
           "|---|" + "---|" * (len(STAGES) + 1)]
  for name, w in rows:
    cells = " | ".join(f"{w.stages[key] / 2**30:.2f}" if key in w.stages else "-"
                       for key, _ in STAGES)
    lines.append(f"| {name} | {cells} | {w.step_rss / 2**30:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
