"""ordering: ties that change no value but keep XLA's order."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from advsemiseg_jax import ordering


def _tree():
  return {"nan": jnp.array([np.nan, 1.0]), "inf": jnp.array([-np.inf, np.inf, 2.0]),
          "one": jnp.array([3.0]), "flags": jnp.array([True, False]),
          "ints": jnp.arange(4, dtype=jnp.int32)}


def test_values_pass_through_unchanged_whatever_the_tree_holds():
  x = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "i": jnp.arange(3)}
  out = jax.jit(ordering.computed_after)(x, _tree())
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(x)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  table = jnp.arange(12.0).reshape(4, 3)
  np.testing.assert_array_equal(jax.jit(ordering.copied_after)(table, _tree()), table)


def test_the_result_depends_on_every_leaf_of_the_tree():
  """Each leaf of the tree reaches the output in the traced program (what
  XLA must respect), here read as: the output's jaxpr uses every input."""
  tree = _tree()
  leaves, treedef = jax.tree.flatten(tree)
  jaxpr = jax.make_jaxpr(lambda x, *leaves: ordering.computed_after(
      x, jax.tree.unflatten(treedef, leaves)))(jnp.ones(3), *leaves).jaxpr
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if isinstance(v, jax.extend.core.Var))
  assert all(v in used for v in jaxpr.invars)
