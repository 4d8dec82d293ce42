"""What trains, and how to train only that.

- `trainable_mask`: a bool tree over the params (adapters, heads, unfrozen norms, ...).
- `partition` / `combine`: split the params into a trainable tree and a frozen tree with `None`
  holes (equinox's idiom), so `jax.grad` differentiates the trainable part alone and XLA never
  computes gradients for frozen weights.
- `transfer_optimizer`: an optax transformation that updates trainable leaves with `tx` and keeps
  no state for frozen ones (`optax.multi_transform` with `optax.set_to_zero`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax
from flax import traverse_util

from flax_adapters.forward import AdaptedModel

TRAINABLE, FROZEN = 'trainable', 'frozen'


def _is_trainable(model: AdaptedModel, key: tuple[str, ...]) -> bool:
  t = model.trainable
  if t.everything:
    return True
  entry = model.sites.get(key[:-1])
  if entry is not None and key[-1] in entry.leaf_names():
    return True
  return any(key[: len(p)] == p for p in t.heads + t.norms + t.others)


def trainable_mask(model: AdaptedModel, params) -> dict:
  """A tree of bools shaped like `params`: True where the leaf trains.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax_adapters as fa
    >>> params = {'q_proj': {'kernel': jnp.ones((4, 4))}, 'out': {'kernel': jnp.ones((4, 2))}}
    >>> cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj'], modules_to_save=['out'])
    >>> model, p = fa.prepare_params(params, cfg)
    >>> fa.trainable_mask(model, p)
    {'q_proj': {'kernel': False, 'lora_a': True, 'lora_b': True}, 'out': {'kernel': True}}
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be the AdaptedModel from prepare_for_transfer, found {type(model).__name__}.')
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: _is_trainable(model, k) for k in flat})


def partition(params, mask):
  """Split `params` by a bool `mask` into `(trainable, frozen)`, each with `None` where the other has a leaf.

  Examples:
    >>> t, f = partition({'a': 1.0, 'b': 2.0}, {'a': True, 'b': False})
    >>> t, f
    ({'a': 1.0, 'b': None}, {'a': None, 'b': 2.0})
    >>> combine(t, f)
    {'a': 1.0, 'b': 2.0}
  """
  _check_mask(params, mask)
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def combine(*trees):
  """Merge trees with `None` holes (from `partition`): the first non-None leaf wins."""

  def first(*leaves):
    return next((leaf for leaf in leaves if leaf is not None), None)

  return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)


def _check_mask(params, mask):
  if jax.tree.structure(params) != jax.tree.structure(mask):
    p = set(traverse_util.flatten_dict(params)) if isinstance(params, Mapping) else None
    m = set(traverse_util.flatten_dict(mask)) if isinstance(mask, Mapping) else None
    detail = ''
    if p is not None and m is not None:
      detail = f' Only in params: {sorted("/".join(k) for k in p - m)[:4]}; only in mask: {sorted("/".join(k) for k in m - p)[:4]}.'
    raise ValueError(
      '`mask` must have exactly the structure of `params` (build it with trainable_mask(model, params) '
      f'for these params).{detail}'
    )


def labels(mask):
  """`'trainable'` / `'frozen'` labels for `optax.multi_transform`."""
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def transfer_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`tx` on the trainable leaves; frozen leaves get zero updates and no optimizer state.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.ones(3), 'frozen': jnp.ones(1000)}
    >>> opt = transfer_optimizer(optax.adam(1e-3), {'w': True, 'frozen': False})
    >>> state = opt.init(params)
    >>> sum(x.size for x in jax.tree.leaves(state))  # adam's mu and nu for 'w', plus its count
    7
  """
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels(mask))
