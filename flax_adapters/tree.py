"""Small helpers over nested-dict params trees (flax.traverse_util does the flattening)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from flax_adapters import paths as paths_lib

Path = tuple[str, ...]


def get_subtree(params: Mapping, path: Path) -> Mapping:
  node = params
  for key in path:
    node = node[key]
  return node


def set_subtree(params: Mapping, path: Path, value) -> dict:
  """A copy of `params` with the subtree at `path` replaced (untouched branches are shared)."""
  if not path:
    return value
  out = dict(params)
  out[path[0]] = set_subtree(params[path[0]], path[1:], value)
  return out


def refuse_nnx_state(params, argument: str = 'params') -> None:
  """An `nnx.State` is not a plain nested dict (flax's traverse_util asserts on it): say how to get one."""
  if type(params).__module__.startswith('flax.nnx'):
    raise TypeError(
      f'`{argument}` is a flax.nnx {type(params).__name__}; pass its plain nested dict, nnx.to_pure_dict(state) '
      '(and nnx.replace_by_pure_dict(state, ...) to put folded weights back).'
    )


def holes(tree) -> str:
  """The paths of a nested dict's None leaves (what `partition` leaves in each half), listed; '' if none."""
  if not isinstance(tree, Mapping):
    return ''
  return _listed(sorted(paths_lib.raw(k) for k, v in traverse_util.flatten_dict(tree).items() if v is None), 4)


def has_leaves(tree) -> bool:
  return bool(traverse_util.flatten_dict(tree)) if isinstance(tree, Mapping) else tree is not None


def _listed(keys: list[str], n: int = 6) -> str:
  return ', '.join(keys[:n]) + (' ...' if len(keys) > n else '')


def foreign_adapter_dicts(params: Mapping, adapter_leaves) -> set[Path]:
  """Paths of dicts whose only leaves are adapter-named: another library's adapter module
  (nnx.LoRALinear's `lora` holds `lora_a`/`lora_b`; nnx.LoRA holds them beside its `base_module`
  dict), part of a bare base tree. Ours always sit beside a layer's own leaves (its kernel)."""
  flat = traverse_util.flatten_dict(params)
  holding = {k[:-1] for k in flat if k[-1] in adapter_leaves}
  layers = {k[:-1] for k in flat if k[-1] not in adapter_leaves}  # dicts with a leaf of their own
  return holding - layers


def check_params_fit(
  params, abstract, *, argument: str = 'params', adapter_leaves=frozenset(), bare_tree: bool = False
) -> None:
  """Raise if `params` does not have the structure and shapes of `abstract` (the model's init).

  Leaves named in `adapter_leaves` that the base model does not create mean the tree was adapted
  already; a bare tree (`abstract` is `params` itself) counts those beside a layer's own leaves.
  """
  if not isinstance(params, Mapping):
    raise TypeError(
      f"`{argument}` must be a nested dict of arrays (the model's params collection), found {type(params).__name__}."
    )
  if 'params' in params and 'params' not in abstract:
    raise TypeError(
      f"`{argument}` looks like a variables dict (it has a 'params' key); pass its params "
      "collection: variables['params']."
    )
  given = traverse_util.flatten_dict(params)
  boxed = sorted(paths_lib.raw(k) for k, v in given.items() if hasattr(v, 'unbox') and not hasattr(v, 'shape'))
  if boxed:
    raise TypeError(
      f'`{argument}` holds metadata boxes (nn.Partitioned from nn.with_partitioning) at {_listed(boxed, 4)}; pass '
      "the plain arrays: nn.unbox(variables)['params'] (keep nn.get_partition_spec(variables) for sharding)."
    )
  expected = traverse_util.flatten_dict(abstract)
  if bare_tree:
    base = {k: None for p in foreign_adapter_dicts(params, adapter_leaves) for k in given if k[:-1] == p}
  else:
    base = expected
  adapters = sorted(paths_lib.raw(k) for k in given if k[-1] in adapter_leaves and k not in base)
  if adapters:
    raise ValueError(
      f'`{argument}` already holds adapter leaves ({_listed(adapters, 4)}). Start from the base params, or '
      'merge_adapters first.'
    )
  missing = sorted(paths_lib.raw(k) for k in expected if k not in given)
  unexpected = sorted(paths_lib.raw(k) for k in given if k not in expected)
  wrong = [
    f'{paths_lib.raw(k)}: expected {tuple(expected[k].shape)}, found {tuple(np.shape(given[k]))}'
    for k in expected
    if k in given and tuple(np.shape(given[k])) != tuple(expected[k].shape)
  ]
  if missing or unexpected or wrong:
    lines = []
    if missing:
      lines.append(f'missing {len(missing)}: {_listed(missing)}')
    if unexpected:
      lines.append(f'unexpected {len(unexpected)}: {_listed(unexpected)}')
    if wrong:
      lines.append(f'wrong shape {len(wrong)}: {"; ".join(wrong[:6])}{" ..." if len(wrong) > 6 else ""}')
    raise ValueError(
      f'`{argument}` does not fit the model: '
      + ' | '.join(lines)
      + '. Pass the params this model was initialised or converted with (and the same config).'
    )
