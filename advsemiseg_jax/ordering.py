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


def copied_after(x, tree):
  """A copy of the array ``x`` made after every leaf of ``tree``: a gather of
  its rows with indices that depend on ``tree``.

  For values whose uses XLA would otherwise hoist: it moves ``computed_after``'s
  addition past a reverse or a transpose (``rev(x + 0)`` becomes ``rev(x) +
  0``) and computes ``rev(x)`` at the start of the step; it cannot move a
  gather's indices.
  """
  rows = computed_after(jnp.arange(x.shape[0]), tree)
  return jnp.take(x, rows, axis=0, mode="clip")
