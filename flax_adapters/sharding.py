"""Sharded training: adapter leaves take their sharding from the kernel they adapt.

LoRA's A follows the kernel's input axes and B its output axes, IA3 scales follow the feature axes
they scale, Locon and Houlsby likewise; rank and bottleneck axes are replicated. So a
column-parallel kernel `P(None, 'model')` gets A `P(None, None)` and B `P(None, 'model')`, and the
adapter's matmuls need no extra communication beyond the base layer's. Optimizer state follows the
params. Everything else is JAX's own SPMD machinery (`jax.jit` with shardings over a `Mesh`;
`jax.distributed` for several hosts).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_adapters import paths as paths_lib
from flax_adapters.forward import AdaptedModel, check_adapter_leaves
from flax_adapters.methods import LEAF_NAMES

P = PartitionSpec


def _as_spec(spec) -> PartitionSpec:
  if spec is None:
    return P()
  if isinstance(spec, NamedSharding):
    return spec.spec
  if isinstance(spec, PartitionSpec):
    return spec
  raise TypeError(f'expected a PartitionSpec, NamedSharding or None, found {spec!r}.')


def partition_specs(model: AdaptedModel, params, base_specs) -> dict:
  """PartitionSpecs for the adapted params, from the specs of the base params.

  Args:
    model: the `AdaptedModel`.
    params: the adapted params (only their structure is used).
    base_specs: a tree like the base params (no adapter leaves) of `PartitionSpec`s (or
      `NamedSharding`s, or None for replicated); e.g. `nn.get_partition_spec(variables)['params']`.
      A callable `(path: tuple[str, ...], leaf) -> spec` also works.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> from jax.sharding import PartitionSpec as P
    >>> x = jnp.ones((2, 8))
    >>> params = nn.Dense(16, name='q_proj').init(jax.random.key(0), x)['params']
    >>> model, p = fa.prepare_for_transfer(nn.Dense(16), params, fa.TransferConfig(
    ...     mode='lora', lora_targets=['re:.*'], modules_to_save=['re:.*']), x)
    >>> specs = fa.partition_specs(model, p, {'kernel': P(None, 'model'), 'bias': P('model')})
    >>> specs['lora_a'], specs['lora_b']
    (P(None, None), P(None, 'model'))
  """
  check_adapter_leaves(params, model)  # base params, or a half of partition: say so before reading shapes
  flat = traverse_util.flatten_dict(params)
  if callable(base_specs):
    base = {k: _as_spec(base_specs(k, v)) for k, v in flat.items() if k[-1] not in LEAF_NAMES}
  else:
    base = {k: _as_spec(v) for k, v in traverse_util.flatten_dict(base_specs).items()}
  out = {}
  for key in flat:
    if key[-1] in LEAF_NAMES:
      continue
    if key not in base:
      raise ValueError(
        f'`base_specs` has no entry for {paths_lib.raw(key)}; give a spec (or None) for every base leaf.'
      )
    spec, ndim = base[key], np.ndim(flat[key])
    if len(spec) > ndim:
      raise ValueError(
        f'`base_specs` gives {paths_lib.raw(key)} the spec {spec}, {len(spec)} entries for a {ndim}-D leaf '
        f'{tuple(np.shape(flat[key]))}; a PartitionSpec names at most one mesh axis (or None) per array axis.'
      )
    out[key] = spec
  for entry in model.plan:
    site = entry.site
    n_stack = len(entry.stack)
    kernel_spec = tuple(base.get(site.path + (site.leaf_key('kernel'),), P()))
    kernel_spec += (None,) * (n_stack + len(site.kernel) - len(kernel_spec))
    # Stacked layer axes (nn.scan) keep the kernel's spec for those axes.
    stacked, axes = kernel_spec[:n_stack], dict(zip(site.kernel, kernel_spec[n_stack:]))
    for method in entry.methods:
      for leaf, letters in method.layout(site).items():
        out[site.path + (leaf,)] = P(*stacked, *(axes.get(c) for c in letters))
  missing = set(flat) - set(out)
  if missing:
    raise ValueError(f"no spec for {sorted(paths_lib.raw(k) for k in missing)[:4]}: they are not in the model's plan.")
  return traverse_util.unflatten_dict(out)


def named_shardings(mesh: Mesh, specs):
  """The `NamedSharding` tree for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _check_specs_cover(params, specs, caller: str) -> None:
  """`specs` has a spec for every leaf of `params` and no other (a spec tree of the base params would
  leave the adapter leaves, and their optimizer state, replicated without a word)."""
  if not isinstance(params, Mapping) or not isinstance(specs, Mapping):
    return
  keys = lambda tree, keep: {tuple(map(str, k)) for k, v in traverse_util.flatten_dict(tree).items() if keep(v)}
  have = keys(params, lambda v: v is not None)  # a half of partition: its holes need no spec
  given = keys(specs, lambda v: True)
  missing, extra = sorted(have - given), sorted(given - keys(params, lambda v: True))
  if missing or extra:
    show = lambda ks: ', '.join(paths_lib.raw(k) for k in ks[:4]) + (' ...' if len(ks) > 4 else '')
    found = '; '.join(
      ([f'no spec for {show(missing)}'] if missing else [])
      + ([f'a spec for {show(extra)}, not in `params`'] if extra else [])
    )
    raise ValueError(
      f'{caller}: `specs` must hold a PartitionSpec for every leaf of `params` and no other; found {found}. '
      'Specs of the base params leave out the adapter leaves: pass specs = fa.partition_specs(model, params, '
      'base_specs) for these params.'
    )


def shard_params(params, mesh: Mesh, specs):
  """Place `params` on `mesh` according to `specs` (from `partition_specs`)."""
  _check_specs_cover(params, specs, 'shard_params')
  return jax.device_put(params, named_shardings(mesh, specs))


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh: Mesh, specs):
  """Shardings for `tx.init(params)`: every param-shaped state leaf follows its param; the rest replicate.

  Works through wrappers that mask frozen leaves (`transfer_optimizer`, `optax.masked`): a state
  leaf is matched to a param by the param's key path, which it ends with, and by shape. Use as
  `jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh, specs))(params)`.
  """
  _check_specs_cover(params, specs, 'optimizer_shardings')
  state = jax.eval_shape(tx.init, params)
  # Keys as strings on both sides: state paths below are stringified, and NNX lists give int keys.
  shardings = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(named_shardings(mesh, specs)).items()}
  shapes = {tuple(map(str, k)): np.shape(v) for k, v in traverse_util.flatten_dict(params).items() if v is not None}
  replicated = NamedSharding(mesh, P())

  def follow(path, leaf):
    keys = tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', '')))) for k in path)
    for start in range(len(keys)):
      key = keys[start:]
      if key in shardings and shapes.get(key) == leaf.shape:
        return shardings[key]
    return replicated

  return jax.tree_util.tree_map_with_path(follow, state)
