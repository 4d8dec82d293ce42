"""The adapted model: the base linen module, run with its adapters applied factored.

`AdaptedModel.apply` is the base model's `apply` under `flax.linen.intercept_methods`: every
adapted module's `__call__` is wrapped so that IA3_FF rescales its input, LoRA/Locon add
`scale·(x·A)·B`, IA3 rescales its output and Houlsby runs its bottleneck on it. The kernels are
never rebuilt as `W + s·A·B`, so a training step costs only what the adapters cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import traverse_util

from flax_adapters import methods as methods_lib
from flax_adapters import paths as paths_lib
from flax_adapters import tree as tree_lib
from flax_adapters.methods.base import BYPASS
from flax_adapters.tracing import Site, call_kwargs_of, nested_call

Path = tuple[str, ...]
# The rng stream that switches adapter dropout on: apply(..., rngs={ADAPTER_DROPOUT: key}).
ADAPTER_DROPOUT = 'adapter_dropout'


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """The adapters on one module, in forward order."""

  site: Site
  methods: tuple[methods_lib.Method, ...]
  # Leading axes the module's params are stacked on (nn.scan / nn.vmap over layers): the adapter
  # leaves carry them too, and the lifted transform slices them like the kernel.
  stack: tuple[int, ...] = ()

  def leaf_names(self) -> tuple[str, ...]:
    return tuple(n for m in self.methods for n in m.leaf_names)


@dataclasses.dataclass(frozen=True)
class Trainable:
  """What trains besides the adapter leaves: everything, or the leaves under these prefixes."""

  everything: bool = False
  # Param path prefixes that train whole (heads, modules_to_save).
  heads: tuple[Path, ...] = ()
  # Norm modules whose scales and biases train (unfreeze_norm).
  norms: tuple[Path, ...] = ()
  others: tuple[Path, ...] = ()


def _split_input(args, kwargs):
  """The module's input array, and a function that rebuilds the call with a new input."""
  if args:
    return args[0], lambda x: ((x, *args[1:]), kwargs)
  for key, value in kwargs.items():
    if isinstance(value, jax.Array):
      return value, lambda x: (args, {**kwargs, key: x})
  return None, None


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptedModel:
  """A linen model with adapters, called exactly like the base: `apply({'params': p}, *args)`.

  Build one with `prepare_for_transfer`. `plan` says which adapters sit on which module;
  `trainable` what else trains; `base` is the (possibly head-swapped) linen module.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name='head')(nn.relu(nn.Dense(8, name='q_proj')(x)))
    >>> x = jnp.ones((3, 4))
    >>> params = Net().init(jax.random.key(0), x)['params']
    >>> cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj'], modules_to_save=['head'])
    >>> model, adapted = fa.prepare_for_transfer(Net(), params, cfg, x, rng=jax.random.key(1))
    >>> sorted(adapted['q_proj'])
    ['bias', 'kernel', 'lora_a', 'lora_b']
    >>> bool(jnp.allclose(model.apply({'params': adapted}, x), Net().apply({'params': params}, x)))
    True
  """

  base: nn.Module
  plan: tuple[SitePlan, ...]
  trainable: Trainable = Trainable()
  config: Any = None
  # What `merge_adapters` folded into the kernels ('dotted.path: method'): those adapters now live in the
  # params' kernels, so this model's plan no longer matches its config (adapter checkpoints refuse it).
  folded: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, '_by_path', {p.site.path: p for p in self.plan})

  @property
  def sites(self) -> Mapping[Path, SitePlan]:
    return self._by_path

  def replace(self, **changes) -> AdaptedModel:
    return dataclasses.replace(self, **changes)

  # -- forward ---------------------------------------------------------------------------------

  def apply(self, variables, *args, **kwargs):
    """`base.apply(variables, *args, **kwargs)` with every adapter applied factored.

    Adapter dropout (`lora_dropout`) is on only when `rngs` holds the `'adapter_dropout'` stream,
    i.e. when training: `model.apply({'params': p}, x, rngs={'adapter_dropout': key})`.
    """
    if not isinstance(variables, Mapping) or 'params' not in variables:
      raise TypeError(
        "`variables` must be a dict with a 'params' collection, as for linen's apply: "
        f"model.apply({{'params': params}}, x); found {type(variables).__name__}"
        + (f' with keys {list(variables)}' if isinstance(variables, Mapping) else '')
        + '.'
      )
    check_adapter_leaves(variables['params'], self)
    with nn.intercept_methods(self._interceptor):
      return self.base.apply(variables, *args, **kwargs)

  __call__ = apply

  def _interceptor(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__' or BYPASS.get():
      return next_fun(*args, **kwargs)
    module = context.module
    entry = self._by_path.get(tuple(module.scope.path)) if module.scope is not None else None
    if entry is None:
      return next_fun(*args, **kwargs)
    site = entry.site
    with nested_call(module) as depth:
      if depth != site.option('call_depth', 1):  # the outer call of a super().__call__ chain
        return next_fun(*args, **kwargs)
      return self._adapted_call(entry, module, next_fun, args, kwargs)

  def _adapted_call(self, entry, module, next_fun, args, kwargs):
    site = entry.site
    params = module.variables.get('params', {})
    leaves = {name: params[name] for name in entry.leaf_names()}
    x, rebuild = _split_input(args, kwargs)
    if x is None:
      raise TypeError(f'the adapted module {site.name} was called without an input array.')
    geometry = call_kwargs_of(site.kind, args, kwargs)
    x_in = x
    for m in entry.methods:
      if m.stage == 'input':
        x_in = m.apply(site, leaves, x_in, None, site.contraction(x.ndim, x.ndim, geometry))
    call_args, call_kwargs = rebuild(x_in)
    y = next_fun(*call_args, **call_kwargs)
    if not isinstance(y, jax.Array):
      raise TypeError(f'{site.describe()} returned {type(y).__name__}; adapters on its output need a single array.')
    call = site.contraction(x.ndim, y.ndim, geometry)
    for m in entry.methods:
      if m.stage != 'input':
        rng = module.make_rng(ADAPTER_DROPOUT) if m.needs_rng and module.has_rng(ADAPTER_DROPOUT) else None
        y = m.apply(site, leaves, x_in, y, call, rng=rng)
    return y


def check_adapter_leaves(params, model: AdaptedModel) -> None:
  """Every planned adapter leaf is present with the planned shape, and none is left unplanned (never ignored)."""
  tree_lib.refuse_nnx_state(params)
  flat = traverse_util.flatten_dict(params) if isinstance(params, Mapping) else {}
  if tree_lib.holes(params):
    raise TypeError(
      f'`params` has None at {tree_lib.holes(params)}: one half of partition(). Pass the whole tree, '
      'fa.combine(trainable, frozen).'
    )
  foreign = tree_lib.foreign_adapter_dicts(params, methods_lib.LEAF_NAMES) if model.base is None and flat else set()
  found: dict[Path, set[str]] = {}
  for key in flat:
    if key and key[-1] in methods_lib.LEAF_NAMES and tuple(key[:-1]) not in foreign:
      found.setdefault(tuple(key[:-1]), set()).add(key[-1])
  for path, names in found.items():
    entry = model.sites.get(path)
    expected = set(entry.leaf_names()) if entry else set()
    extra = names - expected
    if extra:
      raise ValueError(
        f'params at {paths_lib.dotted(path)!r} hold adapter leaves {sorted(extra)} that this model '
        f'does not run (it expects {sorted(expected) or "none"} there), so they would be ignored. '
        'Use the model returned with these params by prepare_for_transfer or load_adapters.'
      )
  for path, entry in model.sites.items():
    missing = set(entry.leaf_names()) - found.get(path, set())
    if missing:
      raise ValueError(
        f'params at {paths_lib.dotted(path)!r} lack the adapter leaves {sorted(missing)} that the '
        'model applies there. Pass the params returned by prepare_for_transfer (or by '
        'load_adapters/combine), not the base params.'
      )
    for method in entry.methods:
      for leaf, shape in method.shapes(entry.site).items():
        want = tuple(entry.stack) + tuple(shape)
        got = tuple(getattr(flat[path + (leaf,)], 'shape', ()))
        if got != want:
          stacked = f' ({len(entry.stack)} leading stacked-layer axes {tuple(entry.stack)})' if entry.stack else ''
          raise ValueError(
            f'params at {paths_lib.dotted(path)!r} hold `{leaf}` of shape {got}, but the {method.name} adapter '
            f'planned there expects {want}{stacked}. The leaf was replaced by one of another rank or layer; '
            'pass the params prepared for this model (prepare_for_transfer, load_adapters).'
          )
