"""Soak test: train under random SIGKILL / SIGTERM and restarts, then compare
with an uninterrupted run.

  python benchmarks/soak.py --minutes=10
  python benchmarks/soak.py --minutes=3 --num_steps=200 --seed=1

Runs ``main.py`` on the demo's quick config (``--num_steps`` long, a
checkpoint every ``--checkpoint_every`` steps) and, until ``--minutes`` have
passed, kills it at a random moment (SIGKILL or SIGTERM, chosen at random;
start-up, training and saving all get hit: see ``Soak.life``) and starts
it again. After every
life it checks that:
  * a SIGTERM'd process exited 0 (after saving the current step);
  * the latest finished checkpoint never went back (monotonic progress), and
    the restart resumed from exactly that step;
  * every finished checkpoint restores (none unreadable).
Then it lets the run finish, runs the same config uninterrupted, and checks
that the final parameters (the whole training state) are bit-identical and
results.json agrees (wall times aside). Prints the kills survived; exits 1 on
any failure.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--minutes", type=float, default=10.0, help="time spent killing")
  p.add_argument("--config", default="configs/demo.py:quick")
  p.add_argument("--num_steps", type=int, default=2000)
  p.add_argument("--checkpoint_every", type=int, default=10)
  p.add_argument("--max_delay", type=float, default=2.0,
                 help="kill up to this many seconds after a life's first new checkpoint")
  p.add_argument("--startup_delay", type=float, default=20.0,
                 help="start-up kills: uniform in [0, this] seconds after the start")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--workdir", default="", help="default: a fresh temporary folder")
  p.add_argument("--compilation_cache", type=int, default=1,
                 help="1: every process shares JAX_COMPILATION_CACHE_DIR=WORKDIR/xla_cache, "
                      "as the README advises for preemptible runs (restarts skip compiling)")
  return p.parse_args()


class Soak:
  """One soak: the interrupted workdir, its lives, and the checks."""

  def __init__(self, args):
    self.args = args
    self.seed = args.seed if args.seed is not None else random.randrange(10**6)
    self.rng = random.Random(self.seed)
    self.base = args.workdir or tempfile.mkdtemp(prefix="soak_")
    self.cut = os.path.join(self.base, "interrupted")
    self.full = os.path.join(self.base, "uninterrupted")
    for d in (self.cut, self.full):
      shutil.rmtree(d, ignore_errors=True)
    os.makedirs(self.base, exist_ok=True)
    self.lives = 0
    self.survived = {"SIGKILL": 0, "SIGTERM": 0}
    self.failures = []

  def command(self, workdir):
    return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={self.args.config}",
            f"--workdir={workdir}", f"--config.num_steps={self.args.num_steps}",
            f"--config.checkpoint_every={self.args.checkpoint_every}",
            "--config.max_to_keep=1000"]

  def start(self, workdir, name):
    log = open(os.path.join(self.base, f"{name}.log"), "w")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if self.args.compilation_cache:
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(self.base, "xla_cache")
    proc = subprocess.Popen(self.command(workdir), stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=env)
    proc.log_path = log.name
    return proc

  def fail(self, message):
    self.failures.append(message)
    print(f"FAIL: {message}", flush=True)

  def steps(self, workdir):
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
      return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())

  def check_readable(self, workdir):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with ocp.StandardCheckpointer() as ckptr:
      for step in self.steps(workdir):
        try:
          ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "default"))
        except Exception as e:  # pylint: disable=broad-except
          self.fail(f"checkpoint {step} unreadable: {type(e).__name__}: {e}")

  def life(self, deadline):
    """Starts a life and kills it; returns False once training has finished.

    One life in five is killed during start-up (uniform in [0, --startup_delay]
    s); the others once training has saved a step beyond the last life's
    latest, plus uniform [0, --max_delay] s (often inside a save).
    """
    before = self.steps(self.cut)
    self.lives += 1
    proc = self.start(self.cut, f"life{self.lives:03d}")
    sig = self.rng.choice([signal.SIGKILL, signal.SIGTERM])
    started = time.time()
    in_startup = self.rng.random() < 0.2
    if in_startup:
      end = started + self.rng.uniform(0, self.args.startup_delay)
    else:
      end = None
      while proc.poll() is None and time.time() < deadline:
        now = self.steps(self.cut)
        if now and (not before or now[-1] > before[-1]):
          end = time.time() + self.rng.uniform(0, self.args.max_delay)
          break
        time.sleep(0.05)
    end = min(end or deadline, deadline)
    while time.time() < end and proc.poll() is None:
      time.sleep(0.02)
    delay = time.time() - started
    finished = proc.poll() is not None
    if not finished:
      proc.send_signal(sig)
    sent = time.time()
    try:
      code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      self.fail(f"life {self.lives}: no exit 120 s after {sig.name}")
      proc.kill()
      code = proc.wait()
    exit_s = time.time() - sent
    log = open(proc.log_path).read()
    after = self.steps(self.cut)
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    if before and resumed and int(resumed.group(1)) != before[-1]:
      self.fail(f"life {self.lives}: resumed at step {resumed.group(1)}, but the "
                f"latest checkpoint was {before[-1]}")
    if before and after and after[-1] < before[-1]:
      self.fail(f"life {self.lives}: latest checkpoint went back from {before[-1]} "
                f"to {after[-1]}")
    if finished:
      if code != 0:
        self.fail(f"life {self.lives}: exited {code} on its own:\n{log[-2000:]}")
      return False
    if sig == signal.SIGTERM and code != 0:
      self.fail(f"life {self.lives}: SIGTERM gave exit status {code}:\n{log[-2000:]}")
    saved = re.search(r"preempted: checkpoint of step (\d+)", log)
    if saved and (not after or after[-1] != int(saved.group(1))):
      self.fail(f"life {self.lives}: SIGTERM saved step {saved.group(1)}, latest "
                f"checkpoint is {after[-1:]}")
    self.check_readable(self.cut)
    self.survived[sig.name] += 1
    where = ("start-up kill" if in_startup else
             f"latest checkpoint {before[-1:] or None} -> {after[-1:] or None}")
    print(f"life {self.lives}: {sig.name} after {delay:.1f} s ({where}), exit "
          f"{code} {exit_s:.1f} s later", flush=True)
    return True

  def final_state(self, workdir):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    step = self.steps(workdir)[-1]
    with ocp.StandardCheckpointer() as ckptr:
      return step, ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "default"))

  def results(self, workdir):
    with open(os.path.join(workdir, "results.json")) as f:
      out = json.load(f)
    out.pop("eval_seconds", None)
    return out

  def run(self):
    print(f"soak seed {self.seed}, workdir {self.base}, compilation cache "
          f"{'on' if self.args.compilation_cache else 'off'}", flush=True)
    reference = self.start(self.full, "uninterrupted")
    deadline = time.time() + 60 * self.args.minutes
    running = True
    while running and time.time() < deadline:
      running = self.life(deadline)
    if running:
      proc = self.start(self.cut, "final")
      if proc.wait() != 0:
        self.fail(f"final restart failed:\n{open(proc.log_path).read()[-2000:]}")
    else:
      print(f"training finished before the time ran out; raise --num_steps "
            f"(now {self.args.num_steps}) for a longer soak", flush=True)
    if reference.wait() != 0:
      self.fail(f"uninterrupted run failed:\n{open(reference.log_path).read()[-2000:]}")
    if not self.failures:
      self.compare()
    kills = sum(self.survived.values())
    print(f"survived {kills} kills ({self.survived['SIGKILL']} SIGKILL, "
          f"{self.survived['SIGTERM']} SIGTERM) in {self.lives} lives; "
          f"{len(self.failures)} failure(s)", flush=True)
    return 1 if self.failures else 0

  def compare(self):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    self.check_readable(self.cut)
    (step_a, a), (step_b, b) = self.final_state(self.full), self.final_state(self.cut)
    if step_a != step_b or step_a != self.args.num_steps:
      self.fail(f"final steps differ: uninterrupted {step_a}, interrupted {step_b}")
      return
    if jax.tree.structure(a) != jax.tree.structure(b):
      self.fail("final states differ in structure")
      return
    differing = [jax.tree_util.keystr(path) for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))
                 if not np.array_equal(np.asarray(x), np.asarray(y))]
    if differing:
      self.fail(f"{len(differing)} final arrays differ, e.g. {differing[:3]}")
    if self.results(self.full) != self.results(self.cut):
      self.fail(f"results.json differ: {self.results(self.full)} vs "
                f"{self.results(self.cut)}")
    if not self.failures:
      print(f"final state at step {step_a} and results.json equal the uninterrupted "
            "run's", flush=True)


if __name__ == "__main__":
  sys.exit(Soak(parse_args()).run())
