"""Fold adapters into the kernels they adapt: `merge_adapters` (serving) and `materialize`.

Each fold is computed in float32 (float64 for float64 kernels) and cast back to the kernel's dtype.
Per module, adapters fold in folding order (additive deltas, then input scales, then output scales);
the first one that cannot fold (Houlsby's nonlinearity, Locon on a weight-standardized conv) stops
folding there, and it and everything after it stay in the model and keep running factored.
"""

from __future__ import annotations

import functools

import jax

from flax_adapters import paths as paths_lib
from flax_adapters.forward import AdaptedModel, SitePlan, check_adapter_leaves
from flax_adapters.methods import fold_order, sort_methods
from flax_adapters.tree import get_subtree, set_subtree


def _fold_site(entry: SitePlan, module_params):
  names = set(entry.leaf_names())
  for leaf, shape, _ in entry.site.leaves:
    want = tuple(entry.stack) + tuple(shape)
    got = tuple(getattr(module_params.get(leaf), 'shape', ())) if leaf in module_params else None
    if got != want:
      raise ValueError(
        f'params at {paths_lib.dotted(entry.site.path)!r}: `{leaf}` is '
        f'{"missing" if got is None else f"of shape {got}"}, but the model was prepared with {want}. '
        'Pass the params prepared for this model (prepare_params / load_adapters).'
      )
  # Methods fold `kernel`/`bias`; a Haiku layer of a bare tree keys them `w`/`b`.
  ours = {entry.site.leaf_key(n): n for n in ('kernel', 'bias')}
  base = {ours.get(k, k): v for k, v in module_params.items() if k not in names}
  remaining = []
  for method in fold_order(entry.methods):
    leaves = {n: module_params[n] for n in method.leaf_names}
    fold = functools.partial(method.fold, entry.site)
    for _ in entry.stack:  # layers stacked by nn.scan fold one by one
      fold = jax.vmap(fold)
    folded = None if remaining else fold(leaves, base)
    if folded is None:
      remaining.append(method)
    else:
      base = folded
  theirs = {v: k for k, v in ours.items()}
  base = {theirs.get(k, k): v for k, v in base.items()}
  for method in remaining:
    base.update({n: module_params[n] for n in method.leaf_names})
  return base, sort_methods(remaining)


def merge_adapters(model: AdaptedModel, params):
  """Fold every foldable adapter into its kernel: returns `(model, params)` for serving.

  When everything folds, the result is the base linen model and a params tree with exactly the base
  structure, shapes and dtypes. Otherwise it is an `AdaptedModel` that still runs the adapters that
  stay (Houlsby, Locon on weight-standardized convs). Keep the unmerged params to continue training.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> x = jnp.ones((2, 4))
    >>> net = nn.Dense(3, name='q_proj')
    >>> params = net.init(jax.random.key(0), x)['params']
    >>> model, p = fa.prepare_for_transfer(net, params, fa.TransferConfig(mode='lora', lora_rank=2,
    ...     lora_targets=['re:.*'], modules_to_save=['re:.*']), x)
    >>> served, merged = fa.merge_adapters(model, p)
    >>> served is model.base, sorted(merged)
    (True, ['bias', 'kernel'])
  """
  if not isinstance(model, AdaptedModel):
    raise TypeError(f'`model` must be an AdaptedModel, found {type(model).__name__}.')
  check_adapter_leaves(params, model)
  plan, folded = [], []
  for entry in model.plan:
    module_params, remaining = _fold_site(entry, get_subtree(params, entry.site.path))
    params = set_subtree(params, entry.site.path, module_params)
    folded += [f'{paths_lib.dotted(entry.site.path)}: {m.name}' for m in entry.methods if m not in remaining]
    if remaining:
      plan.append(SitePlan(site=entry.site, methods=remaining, stack=entry.stack))
  if not plan and model.base is not None:
    return model.base, params
  return model.replace(plan=tuple(plan), folded=model.folded + tuple(folded)), params


def materialize(params, model: AdaptedModel):
  """The params with every weight-space adapter folded in: the reference, framework-neutral forward.

  Differentiable, so `jax.grad(lambda p: loss(apply_fn(materialize(p, model), x)))` trains the
  adapters of any model. Raises if an adapter cannot be folded (Houlsby, or Locon on a
  weight-standardized conv): those need the factored forward of `AdaptedModel.apply`.
  """
  if not isinstance(model, AdaptedModel):
    swapped = ' (the arguments are swapped: materialize(params, model))' if isinstance(params, AdaptedModel) else ''
    raise TypeError(f'`model` must be an AdaptedModel, found {type(model).__name__}{swapped}.')
  check_adapter_leaves(params, model)
  for entry in model.plan:
    module_params, remaining = _fold_site(entry, get_subtree(params, entry.site.path))
    if remaining:
      site = entry.site
      raise ValueError(
        f'materialize cannot fold {[m.name for m in remaining]} at {paths_lib.dotted(site.path)!r} '
        f'({site.module_type}): {fold_order(remaining)[0].fold_refusal(site)}. Run the model with AdaptedModel.apply instead.'
      )
    params = set_subtree(params, entry.site.path, module_params)
  return params
