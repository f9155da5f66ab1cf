"""Speed of the compiled training step for any config, on CPU or GPU.

  python benchmarks/train_step.py --config=configs/voc.py
  python benchmarks/train_step.py --config=configs/voc.py --batch=2 --size=161 \
      --set=model.compute_dtype=bfloat16 --set=model.conv_impl=dot
  python benchmarks/train_step.py --config=configs/voc.py --set=model.remat_stages=3
  python benchmarks/train_step.py --config=configs/voc.py --profile=3   # + where the time goes

Feeds one synthetic batch (no tf.data: the step alone is measured) and prints
one table tagged with the device: compile time; the median, spread and
images/s of ``--steps`` steps after ``--warmup``; FLOPs per step from XLA's
cost analysis and from an analytic count (every convolution and matrix
product of the step's jaxpr, backward included), counted with all taps (what
torch computes) and with only the taps that read the input (XLA's rule), and
XLA's figure over the latter (the 5% cross-check); the
achieved FLOP/s and its share of a peak (``--peak_tflops``, or a matmul
measured in the compute dtype with ``--measure_peak``); XLA's memory
estimate and the peak memory measured (GPU: the allocator's peak; CPU: the
process's maximum resident set). ``--profile=N`` then traces N more steps and
prints benchmarks/op_profile.py's table: op time per kind of op, the busy
share of the step, the longest ops.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from advsemiseg_jax import allocator, parallel  # noqa: E402

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()  # As main.py does (before JAX starts).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from advsemiseg_jax import build, models  # noqa: E402
from advsemiseg_jax.config import apply_overrides, load_config  # noqa: E402
from advsemiseg_jax.step import uses_discriminator, uses_unlabeled  # noqa: E402
from benchmarks import op_profile  # noqa: E402
from benchmarks.machine import cpu_model, max_rss_bytes  # noqa: E402


def build_state(config, num_classes):
  """(initial TrainState, un-jitted step), without importing the data pipeline
  (and so TensorFlow)."""
  _, _, state, step_fn = build.build_training(config, num_classes)
  return state, step_fn


def synthetic_batch(config, batch: int, size, seed: int = 0):
  """Random images (mean-subtracted scale) and labels, 5% ignored."""
  rng = np.random.RandomState(seed)
  h, w = size
  k = config.data.num_classes

  def labels():
    lab = rng.randint(0, k, (batch, h, w)).astype(np.int32)
    lab[rng.rand(batch, h, w) < 0.05] = 255
    return lab

  out = {"image": (rng.randn(batch, h, w, 3) * 50).astype(np.float32), "label": labels()}
  if uses_unlabeled(config.loss):
    out["unlabeled_image"] = (rng.randn(batch, h, w, 3) * 50).astype(np.float32)
  if uses_discriminator(config.loss):
    out["gt_label"] = labels()
  return out


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _conv_flops(eqn, in_bounds: bool) -> float:
  """2 x multiply-adds of one ``conv_general_dilated``. With ``in_bounds``,
  only the (output position, tap) pairs that land on an input element count:
  taps in the zero padding or in the holes of a dilated input (transposed
  convs of the backward pass) are skipped. That is XLA's HloCostAnalysis rule;
  torch and cuDNN do compute those taps."""
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs, out = (v.aval.shape for v in (eqn.invars[0], eqn.invars[1], eqn.outvars[0]))
  macs = float(out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]])
  for i, (l, r, o) in enumerate(zip(lhs_spec[2:], rhs_spec[2:], out_spec[2:])):
    if not in_bounds:
      macs *= out[o] * rhs[r]
      continue
    base = p["lhs_dilation"][i]
    tap = (np.arange(out[o])[:, None] * p["window_strides"][i] - p["padding"][i][0]
           + np.arange(rhs[r])[None, :] * p["rhs_dilation"][i])
    macs *= int(((tap >= 0) & (tap <= (lhs[l] - 1) * base) & (tap % base == 0)).sum())
  return 2.0 * macs


def _live(jaxpr, used):
  """The equations of ``jaxpr`` whose results reach the outputs flagged in
  ``used`` (or that have effects), each with the flags of its own outputs:
  what XLA keeps after dead-code elimination. A custom_vjp's backward rule,
  for one, computes every cotangent, wanted or not."""
  live = {v for v, u in zip(jaxpr.outvars, used) if u and not isinstance(v, jax.extend.core.Literal)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    flags = [v in live for v in eqn.outvars]
    if any(flags) or eqn.effects:
      kept.append((eqn, flags))
      live.update(v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
  return kept[::-1]


def jaxpr_flops(jaxpr, in_bounds: bool = False, used=None) -> float:
  """2 x multiply-adds of every live convolution and matrix product in
  ``jaxpr`` and its sub-jaxprs (scan bodies times their length), ``used``
  flagging the outputs that count (default: all). Convolutions count all
  taps, padding included (what torch computes), or with ``in_bounds`` only
  the taps that read the input (XLA's rule, see ``_conv_flops``)."""
  total = 0.0
  for eqn, flags in _live(jaxpr, used or [True] * len(jaxpr.outvars)):
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn, in_bounds)
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
          [lhs[d] for d in lhs_contract])
    elif name == "cond":
      # One branch runs (``lax.platform_dependent``'s are the same product
      # per platform): the costliest.
      total += max(jaxpr_flops(b.jaxpr, in_bounds, flags) for b in eqn.params["branches"])
    else:
      # A call's outputs are its body's (pjit and the like): pass the flags on.
      inner = sum(jaxpr_flops(j, in_bounds, flags if len(j.outvars) == len(flags) and
                              name in ("pjit", "jit", "closed_call", "remat", "checkpoint")
                              else None)
                  for j in _sub_jaxprs(eqn))
      total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
  return total


def xla_flops(lowered) -> float:
  """FLOPs of XLA's cost analysis of a lowered function, before backend
  passes (after them, GPU convolutions are cuDNN calls that it does not
  count). It counts elementwise work too, so it sits a little above the
  conv+matmul count, and a loop's body once, whatever its trip count."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def step_xla_flops(config, state, batch) -> float:
  """``xla_flops`` of ``config``'s step with its loops (the sequential
  passes, ``iter_size``'s microbatches) unrolled: the same computation as
  the timed step, every iteration counted."""
  generator = models.build_generator(config.model, config.data.num_classes)
  discriminator = models.build_discriminator(config.model)
  step_fn = build.build_step(config, generator, discriminator, state.g_params,
                             unroll_loops=True)
  return xla_flops(jax.jit(step_fn).lower(state, batch))


def scaled(value: float, digits: int = 3) -> str:
  """``value`` in the largest of T, G, M and k that leaves at least 0.1 of it
  ("0.538 T" for a ResNet-101 step, "0.119 G" for the tiny one at 33x33), so that a
  small model's row does not read 0.000."""
  for prefix, unit in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= 0.1 * unit:
      return f"{value / unit:.{digits}f} {prefix}"
  return f"{value:.{digits}f} "


def gib(num_bytes: float) -> str:
  """Bytes in GiB, or in MiB below 0.1 GiB."""
  if num_bytes >= 0.1 * 2**30:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"


def xla_row(flops: float, ratio: float) -> str:
  if np.isnan(flops):   # jaxlib 0.11.2 on a GPU gave no figure (2026-11-28).
    return f"none: XLA's cost analysis gave no FLOPs on {jax.devices()[0].platform}"
  return (f"{scaled(flops)} (XLA / in-bounds = {ratio:.3f}, "
          f"{'within' if abs(ratio - 1) <= 0.05 else 'NOT within'} 5%)")


def generator_forward_flops(config, size) -> float:
  """Closed-form FLOPs of one image's generator forward (convolutions, all
  taps; the paper's DeepLab-v2 at 321x321 is about 147.7 GFLOP)."""
  h, w = size
  width, k = config.model.width, config.data.num_classes
  conv = lambda hw, cin, cout, taps: 2.0 * hw[0] * hw[1] * cin * cout * taps
  half = lambda hw: (-(-hw[0] // 2), -(-hw[1] // 2))
  hw = half((h, w))                        # conv1, stride 2 (padding 3)
  total = conv(hw, 3, width, 49)
  hw = (hw[0] // 2 + 1, hw[1] // 2 + 1)    # ceil-mode max pool
  cin = width
  for i, blocks in enumerate(models.STAGE_SIZES[config.model.backbone]):
    planes = width * 2**i
    for j in range(blocks):
      if i == 1 and j == 0:
        hw = half(hw)
      total += conv(hw, cin, planes, 1) + conv(hw, planes, planes, 9)
      total += conv(hw, planes, planes * 4, 1)
      if j == 0:
        total += conv(hw, cin, planes * 4, 1)
      cin = planes * 4
  return total + config.model.aspp_branches * conv(hw, cin, k, 9)


def matmul_rate(dtype, n: int = 0, repeats: int = 5) -> float:
  """Measured FLOP/s of an n x n matrix product in ``dtype`` (n: 8192 on an
  accelerator, 2048 on CPU)."""
  n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / min(times)


def peak_memory_bytes():
  """(what, bytes): the device allocator's peak on GPU/TPU, else the process's
  maximum resident set size."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak", stats["peak_bytes_in_use"]
  return "process max RSS", max_rss_bytes()


def xla_plan_bytes(compiled) -> float:
  """XLA's memory plan for a compiled step: arguments + temporaries + outputs,
  less what outputs alias (donated arguments); NaN where XLA gives none."""
  mem = compiled.memory_analysis()
  if not mem:
    return float("nan")
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes
          + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def describe_machine() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU {cpu_model()}"
  return f"{device.device_kind} x{jax.device_count()}"


def compile_step(config, batch_size: int, size, mesh):
  """((generator, discriminator), batch, un-jitted step, compiled, seconds to
  lower and compile) for ``batch_size`` synthetic images of ``size`` over
  ``mesh``. As main.py does, the step is compiled from the state's shapes
  (``build.abstract_training``), before the state exists."""
  generator, discriminator, abstract, step_fn = build.abstract_training(
      config, config.data.num_classes)
  batch = parallel.to_global(synthetic_batch(config, batch_size, size), mesh)
  jitted = parallel.jit_train_step(step_fn, mesh)
  start = time.perf_counter()
  compiled = parallel.compile_train_step(jitted, abstract, batch)
  return (generator, discriminator), batch, step_fn, compiled, time.perf_counter() - start


def measure(config, batch_size: int, size, steps: int, warmup: int, profile_steps: int = 0):
  """Compiles and times the step; returns a dict of the measurements (with
  ``profile_steps``: also op_profile's summary of that many more steps)."""
  mesh = parallel.make_mesh()
  (generator, discriminator), batch, step_fn, compiled, compile_s = compile_step(
      config, batch_size, size, mesh)
  state = build.initial_state(config, generator, discriminator, config.data.num_classes)
  state = parallel.replicate_state(state, mesh)
  times = []
  for i in range(warmup + steps):
    begin = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - begin)
  loss = float(metrics["loss_g"])
  # Read before the counts below trace and lower the step again: until here
  # the process holds what main.py's does (the step compiled with JAX's
  # caches cleared, the state, the batch).
  mem_what, mem_bytes = peak_memory_bytes()
  xla_bytes = xla_plan_bytes(compiled)
  step_jaxpr = jax.make_jaxpr(step_fn)(state, batch).jaxpr
  analytic, in_bounds = jaxpr_flops(step_jaxpr), jaxpr_flops(step_jaxpr, in_bounds=True)
  image = jnp.zeros((1,) + tuple(size) + (3,))
  g_forward = jaxpr_flops(jax.make_jaxpr(lambda v: generator.apply(v, image))(
      {"params": state.g_params, "batch_stats": state.g_batch_stats}).jaxpr)
  xla_count = step_xla_flops(config, state, batch)
  profile = None
  if profile_steps:
    try:
      profile = op_profile.profile(compiled, (state, batch), profile_steps)
    except Exception as error:  # noqa: BLE001  The timings above still stand.
      profile = f"the profile failed: {type(error).__name__}: {error}"
  return dict(profile=profile, compile_s=compile_s, times=np.array(times), analytic=analytic,
              in_bounds=in_bounds, g_forward=g_forward, xla_flops=xla_count, xla_bytes=xla_bytes, mem_what=mem_what,
              mem_bytes=mem_bytes, loss=loss)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/voc.py", help="path[:variants]")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE, e.g. model.compute_dtype=bfloat16")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  parser.add_argument("--size", type=int, default=0, help="square crop (0: the config's)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--semi", type=int, default=1,
                      help="1: L_semi on from step 0 (the full step's work)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak to report the share of (0: none unless --measure_peak)")
  parser.add_argument("--measure_peak", action="store_true",
                      help="measure an n x n matmul in the compute dtype as the peak")
  parser.add_argument("--profile", type=int, default=0,
                      help="then trace this many more steps and print where their time goes")
  parser.add_argument("--compile_only", action="store_true",
                      help="lower and compile the step, print the time, stop (with "
                           "JAX_COMPILATION_CACHE_DIR set: fills the cache for later runs)")
  parser.add_argument("--xla_cpu_tuning", type=int, default=1,
                      help="1: add parallel.CPU_XLA_FLAGS (as main.py does)")
  args = parser.parse_args(argv)
  parallel.prepare_cpu_backend(bool(args.xla_cpu_tuning))  # As main.py.

  config = load_config(args.config)
  config.unlock()
  apply_overrides(config, args.set)
  if args.semi and config.loss.lambda_semi > 0:
    config.loss.semi_start = 0
  batch = args.batch or config.data.batch_size
  size = (args.size, args.size) if args.size else tuple(config.data.crop_size)
  if args.compile_only:
    compile_s = compile_step(config, batch, size, parallel.make_mesh())[-1]
    cache = jax.config.jax_compilation_cache_dir or "none"
    print(f"compiled {args.config} {' '.join(args.set)} on {describe_machine()} in "
          f"{compile_s:.1f} s (persistent compilation cache: {cache})")
    return dict(compile_s=compile_s)
  r = measure(config, batch, size, args.steps, args.warmup, args.profile)

  t = r["times"]
  median = float(np.median(t))
  g_fwd = generator_forward_flops(config, size)
  dtype = models.DTYPES[config.model.compute_dtype]
  peak, peak_what = args.peak_tflops * 1e12, "given"
  if not peak and args.measure_peak:
    peak, peak_what = matmul_rate(dtype), f"measured {config.model.compute_dtype} matmul"
  xla_ratio = r["xla_flops"] / r["in_bounds"]
  g_ratio = r["g_forward"] / g_fwd
  # conv_impl=dot's ASPP head is one GEMM over the taps that land inside the
  # feature map; the closed form counts all of them (as torch computes them).
  g_note = ("; the ASPP's taps that read only padding are not computed"
            if g_ratio < 0.9995 and models.resolve_conv_impl(config.model.conv_impl) == "dot"
            else "")
  rows = [
      ("machine", describe_machine()),
      ("jax / jaxlib", f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"),
      ("memory allocator", allocator.active()),
      ("load average (1, 5, 15 min)", " ".join(f"{v:.2f}" for v in os.getloadavg())),
      ("config", f"{args.config} " + " ".join(args.set)),
      ("step", f"batch {batch}, {size[0]}x{size[1]}, backbone {config.model.backbone}, "
               f"{config.model.compute_dtype}, "
               f"conv_impl {models.resolve_conv_impl(config.model.conv_impl)}, "
               f"bn_backward {models.resolve_bn_backward(config.model.bn_backward)}, "
               f"remat {tuple(config.model.remat_stages)}, iter_size {config.optim.iter_size}, "
               f"sequential passes {'on' if build.resolve_sequential_passes(config.optim.sequential_passes) else 'off'}, "
               f"unlabeled branch {'on' if uses_unlabeled(config.loss) else 'off'}"),
      ("compile", f"{r['compile_s']:.1f} s"),
      ("step time, median", f"{median * 1e3:.1f} ms over {len(t)} steps "
                            f"(after {args.warmup} warm-up)"),
      ("step time, min / max", f"{t.min() * 1e3:.1f} / {t.max() * 1e3:.1f} ms"),
      ("images/s (labeled)", f"{batch / median:.2f}"),
      ("steps in 15 min", f"{900 / median:.0f}"),
      ("FLOPs/step, analytic, all taps", f"{scaled(r['analytic'])} (jaxpr convs+matmuls)"),
      ("FLOPs/step, analytic, in-bounds taps", f"{scaled(r['in_bounds'])} "
                                               "(taps on padding not counted, as XLA does)"),
      ("FLOPs/step, XLA cost analysis", xla_row(r["xla_flops"], xla_ratio)),
      ("G forward per image, closed form", f"{scaled(g_fwd, 1)}FLOP (jaxpr count / "
                                           f"closed form = {g_ratio:.3f}{g_note})"),
      ("achieved", f"{scaled(r['analytic'] / median, 2)}FLOP/s"),
  ]
  if peak:
    rows.append(("share of peak", f"{r['analytic'] / median / peak:.1%} of "
                                  f"{peak / 1e12:.1f} TFLOP/s ({peak_what})"))
  rows += [
      ("memory, XLA estimate (args+temp+out)", gib(r["xla_bytes"])),
      (f"memory, {r['mem_what']}", gib(r["mem_bytes"])),
      ("loss_g after the last step", f"{r['loss']:.4f}"),
  ]
  width = max(len(k) for k, _ in rows)
  print(f"\n## train step on {describe_machine()}\n")
  print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|---|")
  for key, value in rows:
    print(f"| {key.ljust(width)} | {value} |")
  if r["profile"]:
    print(f"\n## where the step's time goes ({describe_machine()})\n")
    print(r["profile"] if isinstance(r["profile"], str)
          else op_profile.format_table(r["profile"], median))
  return r


if __name__ == "__main__":
  main()
