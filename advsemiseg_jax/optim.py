"""Optimisers of S and D, with per-parameter behaviour as data.

S's rules are ``(regex, lr_mult, weight_decay)`` triples matched against
parameter paths such as ``layer3_4/conv2/kernel``. The first rule whose regex
matches a path (``re.search``) decides that parameter: ``lr_mult == 0``
freezes it (no update at all), otherwise it trains with SGD at
``lr_mult x`` the poly-decayed base rate, with torch-style weight decay
(``g + wd * p`` before momentum) when ``weight_decay`` is true. Every
parameter must be matched by some rule and every rule must match some
parameter, so a typo fails at start-up instead of silently changing training.
"""
import re
from typing import Sequence

import flax
import optax

# The authors' groups: BN affine parameters frozen, ASPP head ("layer5") at
# 10x, everything else 1x; weight decay on every trained parameter.
DEFAULT_G_RULES = (
    (r"(^|/)(bn\d|downsample_bn)/", 0.0, False),
    (r"^layer5/", 10.0, True),
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


def generator_optimizer(optim_config, params, num_steps: int):
  """SGD (momentum, optional Nesterov) with the rules of ``optim_config.g_rules``."""
  schedule = poly_schedule(optim_config.lr_g, num_steps, optim_config.power)
  rules = tuple(optim_config.g_rules)
  transforms = {}
  for i, (_, lr_mult, decay) in enumerate(rules):
    if lr_mult == 0:
      transforms[f"rule{i}"] = optax.set_to_zero()
      continue
    sgd = optax.sgd(lambda count, m=lr_mult: m * schedule(count),
                    momentum=optim_config.momentum,
                    nesterov=optim_config.nesterov)
    wd = optim_config.weight_decay if decay else 0.0
    transforms[f"rule{i}"] = optax.chain(optax.add_decayed_weights(wd), sgd)
  return optax.multi_transform(transforms, rule_labels(params, rules)), schedule


def discriminator_optimizer(optim_config, num_steps: int):
  """Adam (0.9, 0.99) with the poly schedule, as the authors' code."""
  schedule = poly_schedule(optim_config.lr_d, num_steps, optim_config.power)
  tx = optax.adam(schedule, b1=optim_config.adam_b1, b2=optim_config.adam_b2,
                  eps=1e-8)
  return tx, schedule
