"""What trains, and how to train only that.

- `trainable_mask`: a bool tree over the params (adapters, heads, unfrozen norms, ...).
- `partition` / `combine`: split the params into a trainable tree and a frozen tree with `None`
  holes (equinox's idiom), so `jax.grad` differentiates the trainable part alone and XLA never
  computes gradients for frozen weights.
- `transfer_optimizer`: an optax transformation that updates trainable leaves with `tx` and keeps
  no state for frozen ones (`optax.multi_transform` with `optax.set_to_zero`).
- `make_train_step`: a jitted step that differentiates, updates and stores only what trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from flax_adapters import paths as paths_lib
from flax_adapters import tree as tree_lib
from flax_adapters.forward import AdaptedModel, check_adapter_leaves

TRAINABLE, FROZEN = 'trainable', 'frozen'
# A norm's running statistics: state, never trained, even where they sit in the params tree (a whole
# NNX state: BatchNorm's mean/var; a converted torch state dict: running_mean/var).
NORM_STATISTICS = frozenset({'mean', 'var', 'running_mean', 'running_var', 'num_batches_tracked'})


def _is_state(key: tuple[str, ...], value, flat) -> bool:
  """Leaves that are state, never trained however the mode selects them: non-float leaves (NNX rng
  keys and counters, step counts) and a norm's running statistics (`mean` beside `var`, as in NNX
  BatchNorm, or torch's `running_mean`/`running_var`/`num_batches_tracked`)."""
  dtype = getattr(value, 'dtype', None)
  if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or not jnp.issubdtype(dtype, jnp.inexact):
    return True
  name = key[-1]
  if name in ('running_mean', 'running_var', 'num_batches_tracked'):
    return True
  return name in ('mean', 'var') and key[:-1] + ('mean',) in flat and key[:-1] + ('var',) in flat


def _is_trainable(model: AdaptedModel, key: tuple[str, ...]) -> bool:
  t = model.trainable
  if t.everything:
    return True
  entry = model.sites.get(key[:-1])
  if entry is not None and key[-1] in entry.leaf_names():
    return True
  if key[-1] not in NORM_STATISTICS and any(key[: len(p)] == p for p in t.norms):
    return True
  return any(key[: len(p)] == p for p in t.heads + t.others)


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
  check_adapter_leaves(params, model)  # base params would give an all-False mask: nothing would train
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
    {k: _is_trainable(model, k) and not _is_state(k, v, flat) for k, v in flat.items()}
  )


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
  structures = [jax.tree.structure(t, is_leaf=lambda x: x is None) for t in trees]
  if any(s != structures[0] for s in structures[1:]):
    raise ValueError(
      '`combine` takes trees of one structure with None holes, the halves `partition` returns '
      '(combine(trainable, frozen)); these trees differ in structure.'
    )

  def first(*leaves):
    return next((leaf for leaf in leaves if leaf is not None), None)

  out = jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
  left = tree_lib.holes(out)
  if left:
    raise ValueError(
      f'`combine` left holes at {left}: no tree has a leaf there. Pass both halves from partition: '
      'combine(trainable, frozen).'
    )
  return out


def _check_bools(mask):
  if isinstance(mask, Mapping):
    wrong = [
      f'{paths_lib.raw(k)}={v!r}'
      for k, v in traverse_util.flatten_dict(mask).items()
      if not isinstance(v, (bool, np.bool_))
      and not (getattr(v, 'shape', None) == () and str(getattr(v, 'dtype', '')) == 'bool')
    ]
    if wrong:
      raise TypeError(
        f'`mask` must hold a bool per leaf (True: trains), found {wrong[:3]}{" ..." if len(wrong) > 3 else ""}; '
        'build it with trainable_mask(model, params).'
      )


def _check_mask(params, mask):
  _check_bools(mask)
  if tree_lib.holes(params):
    raise TypeError(
      f'`params` has None at {tree_lib.holes(params)}: it is a half from partition already; partition the whole '
      'tree, fa.combine(trainable, frozen).'
    )
  if jax.tree.structure(params) != jax.tree.structure(mask):
    p = set(traverse_util.flatten_dict(params)) if isinstance(params, Mapping) else None
    m = set(traverse_util.flatten_dict(mask)) if isinstance(mask, Mapping) else None
    detail = ''
    if p is not None and m is not None:
      detail = f' Only in params: {sorted(paths_lib.raw(k) for k in p - m)[:4]}; only in mask: {sorted(paths_lib.raw(k) for k in m - p)[:4]}.'
    raise ValueError(
      '`mask` must have exactly the structure of `params` (build it with trainable_mask(model, params) '
      f'for these params).{detail}'
    )


def labels(mask):
  """`'trainable'` / `'frozen'` labels for `optax.multi_transform`."""
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def transfer_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`tx` on the trainable leaves; frozen leaves get zero updates and no optimizer state.

  `mask` is a bool tree like the params (`trainable_mask(model, params)`), or, as in optax, a
  function of the params that returns one.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.ones(3), 'frozen': jnp.ones(1000)}
    >>> opt = transfer_optimizer(optax.adam(1e-3), {'w': True, 'frozen': False})
    >>> state = opt.init(params)
    >>> sum(x.size for x in jax.tree.leaves(state))  # adam's mu and nu for 'w', plus its count
    7
  """
  if callable(mask):  # optax's convention: a function of the params that returns the mask

    def param_labels(params):
      m = mask(params)
      if callable(m):
        raise TypeError(f'the `mask` function returned another function, {m!r}; it must return the bool tree.')
      _check_bools(m)
      return labels(m)

    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, param_labels)
  _check_bools(mask)
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels(mask))


def make_train_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  donate: bool = True,
  jit: bool = True,
):
  """`step(trainable, opt_state, frozen, *batch) -> (trainable, opt_state, loss[, aux])`.

  The params arrive split by `partition` (a trainable tree and a frozen tree with `None` holes), so
  `jax.grad` differentiates the trainable part alone and XLA never computes frozen-weight
  gradients; `tx` sees the trainable tree only, so it keeps no state for frozen leaves; the
  trainable leaves and the optimizer state are donated, so XLA updates them in place (for full
  fine-tuning that is the whole model and both Adam moments); the frozen tree is an argument, not a
  closure, so it is never baked into the compiled program as a constant.

  Args:
    loss_fn: `loss_fn(params, *batch)` on the whole (combined) params tree; returns the scalar
      loss, or `(loss, aux)` with `has_aux`.
    tx: the optax transformation of the trainable leaves (e.g. `optax.adamw(1e-4)`); initialise
      its state with `tx.init(trainable)`.
    has_aux: `loss_fn` returns `(loss, aux)`; the step then returns aux last.
    donate: donate `trainable` and `opt_state` to the step, so they are updated in place. Do not
      use the arrays passed in after the call (use the returned ones). `partition` shares arrays
      with the tree it splits, so the trainable leaves of that tree are consumed too: keep a copy
      (`jax.tree.map(jnp.copy, params)`) or pass `donate=False` if you need it afterwards.
    jit: return the jitted step (False: the plain function, to jit or shard yourself).

  Returns:
    The step function. `trainable` and `frozen` are the two halves of
    `flax_adapters.partition(params, mask)`; `combine(trainable, frozen)` is the whole tree.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import flax_adapters as fa
    >>> net, x = nn.Dense(2, name='q_proj'), jnp.ones((3, 4))
    >>> model, params = fa.prepare_for_transfer(net, net.init(jax.random.key(0), x)['params'],
    ...     fa.TransferConfig(mode='lora', lora_rank=1, lora_targets=['re:.*']), x)
    >>> trainable, frozen = fa.partition(params, fa.trainable_mask(model, params))
    >>> tx = optax.adam(1e-2)
    >>> opt_state = tx.init(trainable)
    >>> step = fa.make_train_step(lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2), tx)
    >>> trainable, opt_state, loss = step(trainable, opt_state, frozen, x)
    >>> sorted(k for k, v in trainable.items() if v is not None)
    ['lora_a', 'lora_b']
  """

  if not callable(loss_fn):
    raise TypeError(f'`loss_fn` must be a function loss_fn(params, *batch) -> loss; found {type(loss_fn).__name__}.')
  if not (callable(getattr(tx, 'init', None)) and callable(getattr(tx, 'update', None))):
    hint = ' (call it: optax.adamw(1e-4))' if callable(tx) else ''
    raise TypeError(
      f'`tx` must be an optax.GradientTransformation such as optax.adamw(1e-4){hint}; found {type(tx).__name__}.'
    )
  for name, flag in (('has_aux', has_aux), ('donate', donate), ('jit', jit)):
    if not isinstance(flag, bool):
      raise TypeError(f'`{name}` must be a bool, found {flag!r}.')

  def step(trainable, opt_state, frozen, *batch):
    _check_halves(trainable, frozen)
    _check_opt_state(tx, opt_state, trainable)

    def loss_of(t):
      return loss_fn(combine(t, frozen), *batch)

    out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if has_aux:
      loss, aux = out
      return trainable, opt_state, loss, aux
    return trainable, opt_state, out

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _check_halves(trainable, frozen) -> None:
  """`trainable` and `frozen` are the two halves of one `partition`: no leaf is in both (the frozen one
  would be ignored, and the leaf would train)."""
  is_none = lambda x: x is None
  if jax.tree.structure(trainable, is_leaf=is_none) != jax.tree.structure(frozen, is_leaf=is_none):
    return  # combine names the difference
  both = [
    jax.tree_util.keystr(path)
    for (path, t), f in zip(
      jax.tree_util.tree_leaves_with_path(trainable, is_leaf=is_none), jax.tree.leaves(frozen, is_leaf=is_none)
    )
    if t is not None and f is not None
  ]
  if both:
    raise ValueError(
      f'`trainable` and `frozen` both hold a leaf at {", ".join(both[:4])}{" ..." if len(both) > 4 else ""}, '
      'so the frozen one would be ignored and the leaf would train. Pass the two halves of '
      'fa.partition(params, fa.trainable_mask(model, params)): step(trainable, opt_state, frozen, *batch).'
    )


def _check_opt_state(tx, opt_state, trainable) -> None:
  """`opt_state` is `tx.init(trainable)`'s structure (not the state of the whole params tree)."""
  want = jax.tree.structure(jax.eval_shape(tx.init, trainable))
  got = jax.tree.structure(opt_state)
  if want != got:
    raise ValueError(
      '`opt_state` does not have the structure of tx.init(trainable): it was initialised on another '
      'tree (the whole params, or another optimizer). Initialise it on the trainable half: '
      f'opt_state = tx.init(trainable). Expected {str(want)[:200]}; found {str(got)[:200]}.'
    )
