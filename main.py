"""advsemiseg-jax entry point.

  python main.py --config=configs/demo.py --workdir=/tmp/demo
  python main.py --config=configs/demo.py:baseline --workdir=/tmp/base
  python main.py --config=configs/demo.py --workdir=/tmp/demo --config.mode=evaluate
  python main.py --config=configs/demo.py --workdir=/tmp/demo --config.mode=predict \
      --config.predict.input=IMAGES --config.predict.output=/tmp/demo/predictions

Any config field can be overridden: --config.optim.lr_g=1e-3.
Multi-host (one process per host; docs/performance.md): --multihost on TPU
pods and SLURM/Open MPI clusters, or --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS, ...).
"""
import os
import signal

if __name__ == "__main__":
  # First thing: re-run under tcmalloc when the system has it (XLA:CPU's
  # per-step buffers without page faults; advsemiseg_jax/allocator.py).
  from advsemiseg_jax import allocator
  allocator.reexec_with_tcmalloc()

# SIGTERM is blocked in this thread and in every thread started from here on
# (they inherit the mask); faults.start_sigterm_watcher() takes it in a thread
# of its own, so it is seen at once even during a long compile. Before
# training starts there is nothing to save, and it exits 0 at once.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

from absl import app, flags, logging  # noqa: E402  pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path[:variants]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("multihost", False, "jax.distributed.initialize() with the cluster "
                  "detected by JAX (TPU pods, SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0 (multi-host "
                    "without a detected cluster; or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", 0, "Processes in all (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", -1, "This process's index (or JAX_PROCESS_ID).")
flags.DEFINE_bool("xla_cpu_tuning", True, "Add the XLA:CPU flags that make the step "
                  "faster on CPU (parallel.CPU_XLA_FLAGS) unless XLA_FLAGS sets them.")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_library_logs():
  """Keeps the console to our progress lines: library INFO chatter (Orbax's
  per-save messages) is dropped, its warnings and errors are kept."""
  import logging as std_logging

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from advsemiseg_jax import faults
  faults.start_sigterm_watcher()
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only; leave GPUs to JAX.
  from advsemiseg_jax import parallel
  parallel.prepare_cpu_backend(FLAGS.xla_cpu_tuning)  # Before JAX's backend starts.
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, auto=FLAGS.multihost)
  from advsemiseg_jax import train
  from advsemiseg_jax.data.files import DataError
  from advsemiseg_jax.faults import NonFiniteError, Preempted
  from advsemiseg_jax.validate import ConfigError
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  from advsemiseg_jax import allocator
  logging.info("memory allocator: %s (%s=system keeps glibc's)", allocator.active(),
               allocator.ENV_CHOICE)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  except DataError as e:
    raise SystemExit(f"data error: {e}") from None
  except NonFiniteError as e:
    raise SystemExit(f"training stopped: {e}") from None
  except Preempted as e:  # SIGTERM: the checkpoint is saved; exit 0 at once,
    logging.warning("%s", e)  # without waiting for the input threads to wind down.
    logging.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
