"""Faults a long run must survive: preemption (SIGTERM) and non-finite steps.

``Preemption`` turns SIGTERM into a flag that the training loop polls between
steps (it then saves a checkpoint of the current step and raises Preempted);
``start_sigterm_watcher`` makes SIGTERM outside the steps exit at once.
``check_nonfinite`` reads the ``nonfinite`` flag that the jitted step adds to
its measurements, at the moment the trainer fetches them anyway (log time and
before every checkpoint), so no step waits for the host.
"""
import os
import signal
import threading

import jax
import numpy as np
from absl import logging

# Bits of the step's ``nonfinite`` measurement: which part was not finite.
NONFINITE_LOSS, NONFINITE_G_GRAD, NONFINITE_D_GRAD = 1, 2, 4
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient under policy "stop"."""


class Preempted(Exception):
  """Raised by the trainer after SIGTERM, once the checkpoint of the current
  step is saved. main.py exits 0 on it; the traceback keeps the input
  pipeline alive, so nothing waits for its threads to wind down."""


_active = None    # The Preemption of the training loop in progress, if any.
_watcher = None   # The SIGTERM watcher thread, once started.


def start_sigterm_watcher():
  """Takes SIGTERM in a thread of its own (``signal.sigwait``), for a process
  that blocked SIGTERM in every thread before starting any (main.py does).

  A Python signal handler runs only when the main thread gets back to Python
  code, so a SIGTERM that arrives while it is inside a long C call (XLA
  compiling, TensorFlow importing) would wait for that call, a minute or
  more. The watcher sees it at once: while a training loop is armed it asks
  that loop to save and stop (``Preemption``); otherwise there is nothing new
  to save and the process exits 0 at once.
  """
  global _watcher
  if _watcher is None:
    _watcher = threading.Thread(target=_watch_sigterm, name="sigterm-watcher", daemon=True)
    _watcher.start()


def _watch_sigterm():
  while True:
    signal.sigwait({signal.SIGTERM})
    preemption = _active
    if preemption is not None and preemption.armed:
      preemption.request()
    else:
      logging.warning("SIGTERM received outside training steps: nothing new to save; "
                      "exiting")
      logging.flush()
      os._exit(0)  # pylint: disable=protected-access


class Preemption:
  """Context manager that handles SIGTERM (what preemption sends).

  While ``armed`` (the training loop has run its first step) SIGTERM only
  sets ``requested``; the loop then saves a checkpoint of the current step
  and returns. Before that (start-up, compiling: nothing new to save)
  SIGTERM exits at once with status 0. With the watcher thread running
  (``start_sigterm_watcher``) it delivers SIGTERM here; otherwise a signal
  handler is installed when entered from the main thread (elsewhere this is
  inert).
  """

  def __init__(self):
    self.requested = False
    self.armed = False
    self._previous = None

  def request(self):
    if not self.requested:
      logging.warning("SIGTERM received: saving a checkpoint of the current step, "
                      "then exiting")
    self.requested = True

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if not self.armed:
      logging.warning("SIGTERM received before training started: nothing to save; "
                      "exiting")
      raise SystemExit(0)
    self.request()

  def __enter__(self):
    global _active
    _active = self
    if _watcher is None and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    global _active
    _active = None
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False


class NonFiniteGuard:
  """Collects each step's measurements and checks their ``nonfinite`` flags
  when the trainer syncs anyway (log time, before a checkpoint).

  ``mngr`` (the checkpoint manager) is only read, to name the last good
  checkpoint in the error of policy "stop".
  """

  def __init__(self, policy: str, mngr):
    self.policy, self.mngr = policy, mngr
    self.unchecked = []   # (step, device metrics) not yet checked
    self.flagged = 0      # steps flagged in this process

  def add(self, step: int, metrics):
    self.unchecked.append((step, metrics))

  def check(self):
    """Fetches and checks the unchecked steps; raises NonFiniteError (policy
    "stop") after waiting for checkpoints in flight, so the last good one is
    complete."""
    if not self.unchecked:
      return
    first = self.unchecked[0][0]
    fetched = jax.device_get([m for _, m in self.unchecked])
    self.unchecked = []
    try:
      self.flagged += check_nonfinite(fetched, first, self.policy, self._last_good())
    except NonFiniteError:
      self.mngr.wait_until_finished()
      raise

  def _last_good(self) -> str:
    step = self.mngr.latest_step()
    if step is None:
      return "no checkpoint had been written"
    return f"the last good checkpoint is step {step} in {self.mngr.directory}"


def describe_nonfinite(flag: int, metrics: dict) -> str:
  """Which parts of one step were not finite, e.g. "loss_ce=nan, loss_g=nan,
  S's gradient"."""
  parts = [f"{k}={float(v)}" for k, v in sorted(metrics.items())
           if k.startswith("loss") and not np.isfinite(v)]
  if flag & NONFINITE_LOSS and not parts:
    parts.append("a loss")
  if flag & NONFINITE_G_GRAD:
    parts.append("S's gradient")
  if flag & NONFINITE_D_GRAD:
    parts.append("D's gradient")
  return ", ".join(parts)


def check_nonfinite(fetched, first_step: int, policy: str, last_good: str):
  """Inspects fetched per-step measurements (a list of dicts, the first one
  of step ``first_step``; step i's metrics come from the update that starts
  at step i) and removes their ``nonfinite`` entries.

  Policy "stop": raises NonFiniteError naming the first bad step, what was not
  finite, and ``last_good`` (the checkpoint kept). Policy "skip": logs each
  skipped step. Returns the number of flagged steps.
  """
  flagged = 0
  for i, metrics in enumerate(fetched):
    flag = int(metrics.pop("nonfinite", 0))
    if not flag:
      continue
    flagged += 1
    what = describe_nonfinite(flag, metrics)
    if policy == "stop":
      raise NonFiniteError(
          f"non-finite values at step {first_step + i}: {what}. Training stopped; "
          f"nothing after it was saved ({last_good}). Lower the learning rate, "
          "check the inputs, or set --config.nonfinite_policy=skip to skip such "
          "updates")
    logging.warning("step %d: non-finite %s; update skipped (nonfinite_policy=skip)",
                    first_step + i, what)
  return flagged
