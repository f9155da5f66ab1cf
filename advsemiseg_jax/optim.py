"""Optimisers of S and D, with per-parameter behaviour as data.

S's rules are ``(regex, lr_mult, weight_decay)`` triples matched against
parameter paths such as ``layer3_4/conv2/kernel``. The first rule whose regex
matches a path (``re.search``) decides that parameter: ``lr_mult == 0``
freezes it (no update at all), otherwise it trains with SGD at
``lr_mult x`` the poly-decayed base rate, with torch-style weight decay
(``g + wd * p`` before momentum) when ``weight_decay`` is true. Every
parameter must be matched by some rule and every rule must match some
parameter, so a typo fails at start-up instead of silently changing training.

A rule may carry a fourth element, ``repeats`` (default 1): the parameter is
updated that many times per step with the same gradient, as torch 2.x's
single-tensor SGD does for a parameter listed ``repeats`` times in one group
(``sgd``). ``REFERENCE_G_RULES`` uses it to reproduce the authors'
optimiser groups (docs: REFERENCE.md, "QUIRK").
"""
import re
from typing import Any, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from advsemiseg_jax import ordering

# The authors' groups: BN affine parameters frozen, ASPP head ("layer5") at
# 10x, everything else 1x; weight decay on every trained parameter.
DEFAULT_G_RULES = (
    (r"(^|/)(bn\d|downsample_bn)/", 0.0, False),
    (r"^layer5/", 10.0, True),
    (r".*", 1.0, True),
)

# The authors' groups exactly (reference-exact mode): their 1x group walks
# ``modules()`` of the stem and layer1..4 and lists each module's (recursive)
# ``parameters()``, so each bottleneck conv weight appears 3 times (layer,
# block, conv), each shortcut conv weight 4 times (layer, block, downsample,
# conv) and the stem conv once; the 10x head is listed once; BN is frozen.
# With their two-branch ASPP (model.aspp_branches=2), the dilation-18 and -24
# branches get no gradient, and torch's SGD skips a parameter without one (no
# weight decay either): they stay as initialised.
REFERENCE_G_RULES = (
    (r"(^|/)(bn\d|downsample_bn)/", 0.0, False),
    (r"^layer5/conv2d_list_[23]/", 0.0, False),
    (r"^layer5/", 10.0, True),
    (r"^layer\d_\d+/downsample_conv/", 1.0, True, 4),
    (r"^layer\d_\d+/conv\d/", 1.0, True, 3),
    (r".*", 1.0, True),
)


def poly_schedule(base_lr: float, num_steps: int, power: float = 0.9):
  """lr_i = base * (1 - i / num_steps) ** power, step 0 at the base rate."""
  return optax.polynomial_schedule(init_value=base_lr, end_value=0.0,
                                   power=power, transition_steps=num_steps)


def param_paths(params):
  """{path: leaf} with '/'-joined names."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flat


def rule_labels(params, rules: Sequence):
  """Index (as a string label) of the first rule matching each parameter.

  Raises ValueError naming uncovered parameters and unused rules.
  """
  flat = param_paths(params)
  labels, used = {}, set()
  for path in flat:
    for i, rule in enumerate(rules):
      if re.search(rule[0], path):
        labels[path] = f"rule{i}"
        used.add(i)
        break
    else:
      labels[path] = None
  uncovered = [p for p, l in labels.items() if l is None]
  if uncovered:
    raise ValueError(f"optimiser rules cover no rule for parameters: {uncovered[:5]}"
                     f"{' ...' if len(uncovered) > 5 else ''}")
  unused = [rules[i][0] for i in range(len(rules)) if i not in used]
  if unused:
    raise ValueError(f"optimiser rules match no parameter: {unused}")
  return flax.traverse_util.unflatten_dict(labels, sep="/")


def frozen_mask(params, rules: Sequence):
  """True for each parameter whose rule freezes it (``lr_mult == 0``): the
  optimiser never changes it, so the train step needs no gradient for it
  (``step.make_train_step``'s ``frozen``)."""
  labels = rule_labels(params, rules)
  return jax.tree.map(lambda label: rules[int(label[len("rule"):])][1] == 0, labels)


def rule_repeats(rule) -> int:
  """The ``repeats`` of a rule (its optional fourth element; default 1)."""
  if len(rule) not in (3, 4):
    raise ValueError(f"an optimiser rule is (regex, lr_mult, weight_decay[, repeats]), "
                     f"got {rule!r}")
  repeats = rule[3] if len(rule) == 4 else 1
  if int(repeats) != repeats or repeats < 1:
    raise ValueError(f"rule {rule[0]!r}: repeats must be an integer >= 1, got {repeats!r}")
  return int(repeats)


class SGDState(NamedTuple):
  count: Any
  momentum: Any


def sgd(learning_rate, momentum: float, weight_decay: float, repeats: int = 1,
        nesterov: bool = False, in_order: Optional[bool] = None):
  """torch's SGD (momentum, weight decay ``g + weight_decay * p`` before it,
  optional Nesterov), applied ``repeats`` times per step with the same
  gradient.

  ``repeats > 1`` is what torch 2.x's single-tensor SGD (its CPU default,
  ``foreach=False``) does to a parameter listed ``repeats`` times in one
  parameter group: each appearance in turn computes ``d = g + weight_decay *
  p`` on the current ``p``, then ``buf = momentum * buf + d`` and ``p -= lr *
  buf`` (Nesterov: ``p -= lr * (d + momentum * buf)``). On the very first
  step every appearance starts its own fresh buffer (``buf = d``) and the
  last one is kept; afterwards all appearances share that one buffer.
  The appearances are linear in ``(p, buf)``, so they are computed at once
  (``repeated_coefficients``): each parameter and buffer is read and written
  once per step, not ``repeats`` times. That is the same arithmetic up to
  float32 rounding (about one unit in the last place of ``p``, and nearer a
  float64 run of the appearances than doing them one by one in float32), and
  for the ResNet-101 step at 161x161 with ``REFERENCE_G_RULES`` 5,400 fewer
  HLO instructions, and the updates' elementwise passes took 97 ms per step
  instead of 148 in one profile (docs/performance.md).
  ``repeats=1`` gives optax's ``chain(add_decayed_weights(weight_decay),
  sgd(learning_rate, momentum, nesterov))`` update, bit for bit.
  ``learning_rate`` is a float or a schedule of the step count.

  Written out rather than composed from optax for XLA:CPU's memory: with
  ``in_order`` (default: when JAX's default backend is the CPU) the
  parameters are updated one after the other, once every gradient exists
  (each one's scalars depend on the previous one's results). XLA:CPU
  materialises a full-size broadcast of a scalar that several of its
  YNNPACK fusions share (so each parameter gets scalars of its own, and
  the first step's fresh buffer is a momentum of 0, not a full-size
  select: 2.8% off a ResNet-101 step at 161x161, 3.24 -> 3.15 s in one
  vs_torch run); without that order it computed the broadcasts, the decayed
  momenta and copies of the parameters at the start of the step and kept
  them to the end, and ran the updates of all parameters side by side
  (0.15 GiB more at the peak of a ResNet-101 step at 161x161). Elsewhere
  the updates stay independent, for XLA to fuse side by side.
  """
  if in_order is None:
    in_order = jax.default_backend() == "cpu"

  def init_fn(params):
    return SGDState(count=jnp.zeros([], jnp.int32),
                    momentum=jax.tree.map(jnp.zeros_like, params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("sgd needs the parameters to compute its updates")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    # On the first step each appearance starts from a fresh buffer: a
    # momentum of 0 there (a scalar select) gives buf = 0 * buf + d = d.
    mom_now = jnp.where(state.count == 0, 0.0, momentum)

    def leaf(g, buf, p, lr, mom_now, wd, mom):
      d = g + wd * p
      buf = mom_now * buf + d
      return -lr * (d + mom * buf if nesterov else buf), buf

    def repeated_leaf(g, buf, p, p_to_buf, buf_to_buf, g_to_buf, p_to_u, buf_to_u, g_to_u):
      # Every appearance at once (``repeated_coefficients``): the buffer
      # first, then the update from the new buffer, so that the old buffer
      # has one reader and is overwritten in place.
      buf = p_to_buf * p + buf_to_buf * buf + g_to_buf * g
      return p_to_u * p + buf_to_u * buf + g_to_u * g, buf

    if repeats == 1:
      scalars = (lr, mom_now, weight_decay, momentum)
    else:
      leaf, scalars = repeated_leaf, repeated_coefficients(
          lr, mom_now, weight_decay, momentum, repeats, nesterov)

    g_leaves, treedef = jax.tree.flatten(grads)
    out, previous = [], grads   # The first leaf waits for every gradient.
    for g, b, p in zip(g_leaves, treedef.flatten_up_to(state.momentum),
                       treedef.flatten_up_to(params)):
      # Traced scalars, even the constant ones: XLA:CPU shares a constant's
      # full-size broadcast between fusions too (37 MiB more planned for the
      # ResNet-101 step at 161x161 with weight decay and momentum as constants).
      mine = tuple(jnp.asarray(x, jnp.float32) for x in scalars)
      if in_order:
        # Tied to the previous leaf's results only: this leaf's own gradient
        # is an operand of its update anyway.
        mine = ordering.computed_after(mine, previous)
      previous = leaf(g, b, p, *mine)
      out.append(previous)
    updates = treedef.unflatten([u for u, _ in out])
    buffers = treedef.unflatten([b for _, b in out])
    return updates, SGDState(count=optax.safe_increment(state.count), momentum=buffers)

  return optax.GradientTransformation(init_fn, update_fn)


def repeated_coefficients(lr, mom_now, weight_decay, momentum, repeats: int,
                          nesterov: bool = False):
  """``repeats`` consecutive SGD updates with one gradient ``g``, in closed
  form: the scalars ``(p_to_buf, buf_to_buf, g_to_buf, p_to_u, buf_to_u,
  g_to_u)`` such that, from parameter ``p`` and momentum buffer ``buf``, the
  last appearance leaves the buffer ``new = p_to_buf * p + buf_to_buf * buf
  + g_to_buf * g`` and the parameter ``p + u``, ``u = p_to_u * p + buf_to_u
  * new + g_to_u * g``.

  One appearance is linear in ``x = (p, buf)`` plus a multiple of ``g``:
  ``buf' = mom_now * buf + wd * p + g`` and ``p' = p - lr * buf'`` (Nesterov:
  ``p' = p - lr * (d + momentum * buf')``, ``d = g + wd * p``), that is
  ``x' = (I + E) x + v g``; after ``r`` of them ``x_r = (I + D_r) x + q_r g``
  with ``D_{r+1} = E + D_r + E D_r`` and ``q_{r+1} = q_r + E q_r + v``.
  Carrying ``D``, not ``I + D``, keeps the parameter's own factor exact to
  float32 (``1 - lr * wd`` would round most of ``lr * wd`` away). ``u`` is
  written with the new buffer in place of the old one (``buf = (new -
  D10 p - q1 g) / (1 + D11)``; on the first step ``1 + D11`` and ``D01`` are
  both 0 and the old buffer plays no part). The scalars come out of a loop,
  which XLA computes once rather than inside every parameter's update.
  """
  lr, mom_now, wd, mom = (jnp.asarray(x, jnp.float32)
                          for x in (lr, mom_now, weight_decay, momentum))
  scale = lr * (1 + mom) if nesterov else lr
  e = jnp.array([[-scale * wd, -lr * mom * mom_now if nesterov else -lr * mom_now],
                 [wd, mom_now - 1]])
  v = jnp.stack([-scale, jnp.float32(1)])

  def appearance(_, dq):
    d, q = dq
    return e + d + e @ d, q + e @ q + v

  d, q = jax.lax.fori_loop(0, repeats, appearance,
                           (jnp.zeros((2, 2), jnp.float32), jnp.zeros(2, jnp.float32)))
  keep = 1 + d[1, 1]   # the old buffer's factor in the new one
  ratio = jnp.where(keep == 0, 0.0, d[0, 1] / jnp.where(keep == 0, 1.0, keep))
  return (d[1, 0], keep, q[1],
          d[0, 0] - ratio * d[1, 0], ratio, q[0] - ratio * q[1])


def generator_optimizer(optim_config, params, num_steps: int):
  """SGD (momentum, optional Nesterov) with the rules of ``optim_config.g_rules``."""
  schedule = poly_schedule(optim_config.lr_g, num_steps, optim_config.power)
  rules = tuple(optim_config.g_rules)
  transforms = {}
  for i, rule in enumerate(rules):
    _, lr_mult, decay = rule[:3]
    if lr_mult == 0:
      transforms[f"rule{i}"] = optax.set_to_zero()
      continue
    lr = lambda count, m=lr_mult: m * schedule(count)
    wd = optim_config.weight_decay if decay else 0.0
    transforms[f"rule{i}"] = sgd(lr, optim_config.momentum, wd, rule_repeats(rule),
                                 optim_config.nesterov)
  return optax.multi_transform(transforms, rule_labels(params, rules)), schedule


def discriminator_optimizer(optim_config, num_steps: int):
  """Adam (0.9, 0.99) with the poly schedule, as the authors' code."""
  schedule = poly_schedule(optim_config.lr_d, num_steps, optim_config.power)
  tx = optax.adam(schedule, b1=optim_config.adam_b1, b2=optim_config.adam_b2,
                  eps=1e-8)
  return tx, schedule
