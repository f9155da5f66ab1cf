"""Evaluation order that XLA keeps: data dependencies, not barriers.

XLA:CPU removes optimization barriers before it schedules, and its default
scheduler computes any value as soon as its inputs exist. ``computed_after``
ties a value to others through a zero-valued data dependency, so that XLA
can neither compute what uses it earlier nor share it (by common
subexpression elimination) with an identical value computed earlier.
"""
import jax
import jax.numpy as jnp


def computed_after(x, tree):
  """``x`` (an array or a tree of arrays), made to depend on every leaf of
  ``tree``, so that XLA computes the whole of ``tree`` before anything that
  uses the result.

  ``x + sum(0 * one element of each leaf)`` (one sum, added to each leaf of
  ``x``); ``nan_to_num`` keeps a non-finite leaf from reaching ``x``.
  """
  zero = sum(jnp.nan_to_num(leaf.reshape(-1)[0]).astype(jnp.float32) * 0
             for leaf in jax.tree.leaves(tree))
  return jax.tree.map(lambda leaf: leaf + zero.astype(leaf.dtype), x)
