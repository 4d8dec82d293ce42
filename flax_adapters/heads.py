"""The heads protocol, and head surgery (remove, keep, add heads) on a model and its params.

A model takes part in head surgery if it has a field `heads` (a mapping, or a tuple of
`(name, spec)` pairs, from head name to `{'modality': str, 'num_tracks': int}`) and keeps each
head's parameters under `params['heads'][name]`. `model.clone(heads=...)` must build the same
trunk with other heads.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

HEADS_KEY = 'heads'


def head_items(heads, *, what: str = 'heads') -> list[tuple[str, object]]:
  """`heads` (a mapping, or a sequence of `(name, spec)` pairs) as a list of `(name, spec)` pairs.

  Names are checked: non-empty strings without `/` or `.` (they become param-path keys), each
  given once. `what` names the argument in the errors.

  Examples:
    >>> head_items([('my_atac', {'modality': 'atac', 'num_tracks': 4})])
    [('my_atac', {'modality': 'atac', 'num_tracks': 4})]
  """
  if isinstance(heads, Mapping):
    items = list(heads.items())
  elif (
    isinstance(heads, Sequence)
    and not isinstance(heads, str)
    and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in heads)
  ):
    items = [tuple(p) for p in heads]
  else:
    raise TypeError(
      f'`{what}` must map head names to specs (a dict or (name, spec) pairs), e.g. '
      f"{{'my_atac': {{'modality': 'atac', 'num_tracks': 4}}}}; found {type(heads).__name__} {heads!r}."
    )
  seen = set()
  for name, _ in items:
    if not isinstance(name, str) or not name or '/' in name or '.' in name:
      raise ValueError(
        f'`{what}`: head names must be non-empty strings without "/" or ".", found {name!r}. '
        "Fix: use a name like 'my_atac'."
      )
    if name in seen:
      raise ValueError(f'`{what}` gives head {name!r} twice. Fix: give each head once.')
    seen.add(name)
  return items


def model_heads(model) -> dict[str, dict] | None:
  """The model's heads as `{name: spec}`, or None if it does not follow the heads protocol."""
  heads = getattr(model, 'heads', None)
  if heads is None:
    return None
  return {k: dict(v) for k, v in head_items(heads, what=f'{type(model).__name__}.heads')}


def _unknown_heads(field: str, names, current) -> str | None:
  unknown = [h for h in names if h not in current]
  if not unknown:
    return None
  near = {h: difflib.get_close_matches(str(h), list(current), n=1) for h in unknown}
  hint = '; '.join(f'{h!r} -> {m[0]!r}' for h, m in near.items() if m)
  return (
    f'`{field}` names head(s) {unknown} that the model does not have; its heads are {list(current)}. '
    f'Fix: name existing heads in `{field}`' + (f' (did you mean {hint}?)' if hint else '') + '.'
  )


def swap_heads(model: nn.Module, *, remove=(), keep=None, new=None) -> tuple[nn.Module, list[str], list[str]]:
  """The model with heads removed / kept / added, the names of the heads kept, and of the new ones.

  If the model has a field `fresh_heads`, it is set to the names of the new heads, so that state the
  model keeps outside `params` (AlphaGenome's track means) is made fresh for a new head that replaces a
  removed head of the same name, rather than taken from the removed one.
  """
  new = dict(new or {})
  current = model_heads(model)
  if current is None:
    raise TypeError(
      f'`remove_heads`/`keep_heads`/`new_heads` need a model with a `heads` field, but '
      f'{type(model).__name__} has none. Follow the heads protocol (see flax_adapters.heads), or '
      'train your own output layer with `modules_to_save`.'
    )
  errors = [
    e for e in (_unknown_heads('remove_heads', remove, current), _unknown_heads('keep_heads', keep or (), current)) if e
  ]
  if errors:
    raise ValueError(' '.join(errors))
  kept = [h for h in current if h in keep] if keep is not None else [h for h in current if h not in remove]
  clash = [h for h in new if h in kept]
  if clash:
    fix = (
      'drop them from `keep_heads` to replace them' if keep is not None else f'remove them first (remove_heads={clash})'
    )
    raise ValueError(f'`new_heads` {clash} already exist in the model and are kept; {fix}, or choose new names.')
  specs = {h: current[h] for h in kept}
  specs.update(new)
  heads = specs if isinstance(model.heads, Mapping) else tuple((k, dict(v)) for k, v in specs.items())
  changes = {'heads': heads}
  if 'fresh_heads' in {f.name for f in dataclasses.fields(model)}:
    changes['fresh_heads'] = tuple(new)
  try:
    swapped = model.clone(**changes)
  except (TypeError, ValueError) as e:
    if not new:
      raise
    raise (ValueError if isinstance(e, ValueError) else TypeError)(
      f'`new_heads` {list(new)}: {type(model).__name__} refuses these head specs: {e}'
    ) from e
  return swapped, kept, list(new)


def _concrete(args):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, args)


def init_heads(model: nn.Module, names, rng, args, kwargs) -> dict:
  """Initialise only the named heads (jit + dead-code elimination skips the trunk's init)."""
  if not names:
    return {}

  def init(key):
    a, kw = _concrete((args, kwargs))
    params = model.init({'params': key, 'dropout': key}, *a, **kw)['params']
    return {h: params[HEADS_KEY][h] for h in names}

  return jax.jit(init)(rng)


def transplant(model: nn.Module, params, rng, args, kwargs, *, remove=(), keep=None, new=None):
  """Head surgery on the model and its params: kept heads keep their arrays, new heads are initialised."""
  model, kept, added = swap_heads(model, remove=remove, keep=keep, new=new)
  fresh = init_heads(model, added, rng, args, kwargs)
  old = params.get(HEADS_KEY, {})
  return model, {**params, HEADS_KEY: {**{h: old[h] for h in kept if h in old}, **fresh}}
