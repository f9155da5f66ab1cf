"""Models, initial training state and the train step, built from a config.

Kept apart from ``train.py`` so that benchmarks and tools can build a step
without importing the data pipeline (and so TensorFlow).
"""
import jax
import jax.numpy as jnp

from advsemiseg_jax import convert, models, optim
from advsemiseg_jax.step import TrainState, make_train_step


# XLA:CPU's default scheduler runs the initialisers of all parameters side by
# side: ResNet-101's init planned 2.3 GiB of temporaries for 0.17 GiB of
# parameters, the process's peak. Its memory-optimising scheduler plans 0.14.
# LLVM's default optimisation level spends seconds on each threefry kernel
# (JAX's partitionable threefry, on an AVX2 EPYC: 13.8 s to compile the tiny
# generator's init, 11.5 s for D's, 22.6 s for ResNet-101's); level 1 gives
# bit-identical parameters in 5.7, 1.7 and 16.0 s and runs as fast.
_CPU_INIT_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                     "xla_backend_optimization_level": 1}


def _run_init(fn, rng):
  """``jax.jit(fn)(rng)``, compiled with ``_CPU_INIT_OPTIONS`` on a CPU."""
  options = _CPU_INIT_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(rng).compile(compiler_options=options)(rng)


def resolve_sequential_passes(sequential_passes, backend: str = None) -> bool:
  """``optim.sequential_passes`` for this run: None (auto) is on for a CPU,
  where it needs less memory for about the same time (ResNet-101, batch 2,
  2-core CPU: peak RSS 4.76 -> 3.44 GiB at 321x321 for 1% less time, 2.12 ->
  1.91 GiB at 161 for 1% more; docs/performance.md), and off elsewhere, where
  it is not measured yet."""
  if sequential_passes is not None:
    return bool(sequential_passes)
  return (backend or jax.default_backend()) == "cpu"


def init_variables(config, generator, discriminator, num_classes, rng, run=_run_init):
  """Fresh variables of S and D (shapes do not depend on the input size).
  ``run(fn, rng)`` runs an initialiser: compiled on its own by default."""
  g_rng, d_rng = jax.random.split(rng)
  x = jnp.zeros((1, 33, 33, 3), jnp.float32)
  g_vars = run(lambda r: generator.init(r, x, train=False), g_rng)
  p = jnp.zeros((1, 64, 64, num_classes), jnp.float32)
  d_vars = run(lambda r: discriminator.init(r, p), d_rng)
  return g_vars, d_vars


def optimizers(config, g_params):
  """(g_tx, g_schedule, d_tx, d_schedule) of ``config.optim``."""
  g_tx, g_sched = optim.generator_optimizer(config.optim, g_params, config.num_steps)
  d_tx, d_sched = optim.discriminator_optimizer(config.optim, config.num_steps)
  return g_tx, g_sched, d_tx, d_sched


def build_step(config, generator, discriminator, g_params, unroll_loops: bool = False):
  """The un-jitted train_step of ``config`` (``step.make_train_step``; with
  ``unroll_loops``, its loops traced as straight-line code, for counting)."""
  g_tx, g_sched, d_tx, d_sched = optimizers(config, g_params)
  return make_train_step(config.loss, generator, discriminator, g_tx, d_tx,
                         g_sched, d_sched, nonfinite_policy=config.nonfinite_policy,
                         iter_size=config.optim.iter_size,
                         sequential_passes=resolve_sequential_passes(
                             config.optim.sequential_passes),
                         unroll_loops=unroll_loops,
                         frozen=optim.frozen_mask(g_params, config.optim.g_rules))


def build_training(config, num_classes: int):
  """(generator, discriminator, initial TrainState, un-jitted train_step)."""
  generator, discriminator = build_models(config, num_classes)
  state = initial_state(config, generator, discriminator, num_classes)
  step_fn = build_step(config, generator, discriminator, state.g_params)
  return generator, discriminator, state, step_fn


def abstract_training(config, num_classes: int):
  """(generator, discriminator, the initial TrainState's shapes and dtypes as
  ``jax.ShapeDtypeStruct``s, un-jitted train_step), computing nothing.

  For compiling the step before the state exists (``train.py``): the
  compiler's transient memory then does not sit on top of the state's.
  """
  generator, discriminator = build_models(config, num_classes)
  state = jax.eval_shape(lambda: _fresh_state(config, generator, discriminator, num_classes,
                                              run=lambda fn, rng: fn(rng)))
  step_fn = build_step(config, generator, discriminator, state.g_params)
  return generator, discriminator, state, step_fn


def build_models(config, num_classes: int):
  """(generator, discriminator) of ``config.model``."""
  return (models.build_generator(config.model, num_classes),
          models.build_discriminator(config.model))


def initial_state(config, generator, discriminator, num_classes: int):
  """The TrainState a run starts from: fresh variables (seeded by
  ``config.seed``), with ``config.init_from``'s weights copied in where name
  and shape match."""
  return _fresh_state(config, generator, discriminator, num_classes,
                      init_from=config.init_from)


def _fresh_state(config, generator, discriminator, num_classes, init_from="",
                 run=_run_init):
  rng = jax.random.PRNGKey(config.seed)
  g_vars, d_vars = init_variables(config, generator, discriminator, num_classes, rng, run)
  if init_from:  # .pth or Orbax weights, copied where name and shape match.
    g_vars, d_vars = convert.load_init_from(init_from, g_vars, d_vars)
  g_tx, _, d_tx, _ = optimizers(config, g_vars["params"])
  return TrainState(
      step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
      g_batch_stats=g_vars["batch_stats"], d_params=d_vars["params"],
      g_opt_state=g_tx.init(g_vars["params"]),
      d_opt_state=d_tx.init(d_vars["params"]), rng=rng,
      nonfinite_skips=jnp.zeros((), jnp.int32))
