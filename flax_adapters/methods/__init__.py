"""Adapter methods, and the registry that names them.

Each method is one module of pure array math (one class, see `base.Method`); the registry maps
names to classes. `TransferConfig`'s modes, the forward order, the summary groups, the leaf names
that mark adapter leaves in a params tree, checkpoints and PEFT conversion all read the registry, so
a new method is one file and one `register_method` call — in this package or in user code.

Forward order within a module call: input stages, then additive deltas, then output transforms,
each in registration order (IA3 before the Houlsby bottleneck).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Iterable

from flax_adapters.methods.base import FOLD_ORDER, STAGES, AdapterError, Method
from flax_adapters.methods.houlsby import Houlsby
from flax_adapters.methods.ia3 import IA3, IA3FF
from flax_adapters.methods.locon import Locon
from flax_adapters.methods.lora import LoRA
from flax_adapters.tracing import KINDS

REGISTRY: dict[str, type[Method]] = {}
# Leaf names a base model may have (flax/NNX layers, Haiku's w/b/offset, norm running statistics as
# training.NORM_STATISTICS lists them); an adapter leaf must not shadow one.
_RESERVED = frozenset(
  {'kernel', 'bias', 'scale', 'embedding', 'w', 'b', 'offset'}
  | {'mean', 'var', 'running_mean', 'running_var', 'num_batches_tracked'}
)
# TransferConfig's modes that are not methods.
_BASE_MODES = ('linear', 'full')
# param_summary's rows that are not methods (summary.BASE_GROUPS) and its last row.
_SUMMARY_ROWS = ('trunk', 'norms', 'heads', 'modules_to_save', 'total')
# Hooks without a usable default in `Method`.
_REQUIRED_HOOKS = ('shapes', 'init', 'apply')


def register_method(cls: type[Method]) -> type[Method]:
  """Add an adapter method class to the registry (usable as a class decorator); returns `cls`.

  The class must subclass `Method`, be a dataclass itself, declare `name`, `leaf_names`, `stage` and
  `kinds` (module kinds from `tracing.KINDS`) and define `shapes`, `init` and `apply`; its name and leaf
  names must be new, and its mode must not be another method's.

  Examples:
    >>> import dataclasses, jax.numpy as jnp
    >>> import flax_adapters as fa
    >>> @fa.register_method
    ... @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class OutputShift(fa.Method):
    ...   name = 'output_shift'
    ...   leaf_names = ('shift',)
    ...   stage = 'output'
    ...   kinds = ('dense',)
    ...   def shapes(self, site):
    ...     return {'shift': site.size(site.feature_out)}
    ...   def init(self, rng, site, dtype):
    ...     return {'shift': jnp.zeros(self.shapes(site)['shift'], dtype)}
    ...   def apply(self, site, leaves, x, y, call, rng=None):
    ...     return y + leaves['shift'].astype(y.dtype)
    >>> 'output_shift' in fa.TransferConfig.known_modes()
    True
    >>> fa.unregister_method('output_shift')
  """
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise TypeError(f'`register_method` takes a subclass of flax_adapters.Method, found {cls!r}.')
  # `is_dataclass` is inherited from Method: the class itself must be decorated, or its annotated
  # hyperparameters are plain class attributes (not constructor arguments, not saved in checkpoints).
  if '__dataclass_fields__' not in vars(cls):
    raise TypeError(
      f'{cls.__name__} must be a dataclass itself (subclassing fa.Method is not enough): decorate it with '
      '@dataclasses.dataclass(frozen=True, kw_only=True), so that its fields are its hyperparameters.'
    )
  for attr in ('name', 'leaf_names', 'stage'):
    if attr not in dir(cls):
      raise TypeError(f'{cls.__name__} must declare the class attribute `{attr}`.')
  if not isinstance(cls.name, str) or not cls.name.isidentifier():
    raise ValueError(f'{cls.__name__}.name must be an identifier-like string, found {cls.name!r}.')
  if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
    raise ValueError(
      f'an adapter method named {cls.name!r} is already registered ({REGISTRY[cls.name].__name__}); '
      'choose another `name`, or unregister_method it first.'
    )
  if cls.name in _BASE_MODES or cls.transfer_mode() in _BASE_MODES:
    raise ValueError(
      f"{cls.__name__}: name {cls.name!r} / mode {cls.transfer_mode()!r} is one of TransferConfig's base modes "
      f'{list(_BASE_MODES)} (what trains, not a method), so a config could never place it; choose another `name`.'
    )
  if cls.name in _SUMMARY_ROWS or cls.summary_group() in _SUMMARY_ROWS:
    raise ValueError(
      f"{cls.__name__}: name {cls.name!r} / group {cls.summary_group()!r} is one of param_summary's own rows "
      f'{list(_SUMMARY_ROWS)}, so its parameters would be counted as those; choose another `name` (or `group`).'
    )
  _check_mode(cls)
  _check_hooks(cls)
  if cls.stage not in STAGES:
    raise ValueError(f'{cls.__name__}.stage must be one of {list(STAGES)}, found {cls.stage!r}.')
  if (
    not isinstance(cls.leaf_names, (tuple, list))
    or not cls.leaf_names
    or not all(isinstance(n, str) and n for n in cls.leaf_names)
  ):
    raise ValueError(
      f'{cls.__name__}.leaf_names must be a non-empty tuple of strings, found {cls.leaf_names!r}'
      + (f' (write ({cls.leaf_names!r},): a string is not a tuple of names)' if isinstance(cls.leaf_names, str) else '')
      + '.'
    )
  if len(set(cls.leaf_names)) != len(cls.leaf_names):
    raise ValueError(f'{cls.__name__}.leaf_names {cls.leaf_names!r} repeats a name; each leaf needs its own.')
  _check_kinds(cls)
  taken = {n: other.__name__ for other in REGISTRY.values() if other is not cls for n in other.leaf_names}
  clash = [n for n in cls.leaf_names if n in taken or n in _RESERVED]
  if clash:
    owners = {n: taken.get(n, 'base layers') for n in clash}
    raise ValueError(
      f'{cls.__name__}.leaf_names {clash} are already used by {owners}; adapter leaves are recognised by '
      f"name in a params tree, so give them names of their own (e.g. '{cls.name}_{clash[0]}')."
    )
  REGISTRY[cls.name] = cls
  return cls


def _overrides(cls: type[Method], attr: str) -> bool:
  return getattr(cls, attr) is not getattr(Method, attr)


def _check_hooks(cls: type[Method]) -> None:
  """The hooks every method must define (the others have defaults), named before anything runs them."""
  missing = [h for h in _REQUIRED_HOOKS if not _overrides(cls, h)]
  if missing:
    what = {
      'shapes': '`shapes(self, site)` -> {leaf name: shape tuple}',
      'init': '`init(self, rng, site, dtype)` -> {leaf name: array of that shape}',
      'apply': '`apply(self, site, leaves, x, y, call, rng=None)` -> the new input (stage input) or output',
    }
    raise TypeError(
      f'{cls.__name__} does not define {missing}, which every adapter method needs: '
      + '; '.join(what[h] for h in missing)
      + '. See flax_adapters.methods.base and the README section "Your own adapter method".'
    )


def _check_kinds(cls: type[Method]) -> None:
  kinds = cls.kinds
  if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
    raise ValueError(f'{cls.__name__}.kinds must be a tuple of module kinds from {list(KINDS)}, found {kinds!r}.')
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(
      f'{cls.__name__}.kinds {unknown} are not module kinds, so it would never be placed; the kinds are {list(KINDS)} '
      "(e.g. kinds = ('dense', 'dense_general', 'einsum') for linear layers)."
    )
  if not kinds and not _overrides(cls, 'placement_kinds'):
    raise ValueError(
      f'{cls.__name__}.kinds is empty, so no module could ever take it; name the module kinds it adapts from '
      f"{list(KINDS)} (e.g. kinds = ('dense',)), or define placement_kinds()."
    )


def _check_mode(cls: type[Method]) -> None:
  """One mode, one set of rules: a second method on a taken mode must compile its own (as IA3_FF does)."""
  mode = cls.transfer_mode()
  owners = [other.__name__ for other in REGISTRY.values() if other is not cls and other.transfer_mode() == mode]
  if mode is not None and owners and 'rules_from_config' not in vars(cls):
    raise ValueError(
      f'{cls.__name__}.mode {mode!r} is already the TransferConfig mode of {owners}: every config with mode {mode!r} '
      f'would also place {cls.__name__} (reading options[{cls.name!r}]). Choose another `mode` (or leave it out: '
      f'the mode defaults to the name {cls.name!r}), set mode = None for a rules-only method, or define '
      'rules_from_config to compile the shared mode yourself.'
    )


def unregister_method(name: str) -> None:
  """Remove a method from the registry (e.g. at the end of a test)."""
  if name not in REGISTRY:
    raise KeyError(f'no adapter method named {name!r} is registered; registered: {sorted(REGISTRY)}.')
  del REGISTRY[name]


def get_method(name: str) -> type[Method]:
  if name not in REGISTRY:
    raise ValueError(
      f'adapter method {name!r} is not registered (registered: {sorted(REGISTRY)}). If it is your own '
      'method, import the module that registers it (flax_adapters.register_method) first.'
    )
  return REGISTRY[name]


class _LeafNames(collections.abc.Set):
  """The leaf names of every registered method, as a live set (it follows registrations)."""

  def __contains__(self, name) -> bool:
    return any(name in cls.leaf_names for cls in REGISTRY.values())

  def __iter__(self):
    return iter(dict.fromkeys(n for cls in REGISTRY.values() for n in cls.leaf_names))

  def __len__(self) -> int:
    return sum(1 for _ in self)

  def __repr__(self) -> str:
    return f'LEAF_NAMES({sorted(self)})'


LEAF_NAMES = _LeafNames()


def modes() -> tuple[str, ...]:
  """The TransferConfig modes the registered methods provide, in registration order."""
  out = (cls.transfer_mode() for cls in REGISTRY.values())
  return tuple(dict.fromkeys(m for m in out if m is not None))


def classes_for_mode(mode: str) -> list[type[Method]]:
  return [cls for cls in REGISTRY.values() if cls.transfer_mode() == mode]


def summary_groups() -> tuple[str, ...]:
  return tuple(dict.fromkeys(cls.summary_group() for cls in REGISTRY.values()))


def _registration_index(method: Method) -> int:
  names = list(REGISTRY)
  return names.index(method.name) if method.name in names else len(names)


def sort_methods(methods: Iterable[Method]) -> tuple[Method, ...]:
  """Methods in forward order: input stages, then additive, then output; registration order within."""
  return tuple(sorted(methods, key=lambda m: (STAGES.index(m.stage), _registration_index(m))))


def fold_order(methods: Iterable[Method]) -> tuple[Method, ...]:
  """Methods in folding order: additive deltas, then input transforms, then output transforms.

  Folding composes outward from the layer: the input transform the layer sees last (the last
  registered, see `sort_methods`) folds first, so input stages fold in reverse registration order;
  output stages fold in forward order.
  """

  def key(m: Method):
    index = _registration_index(m)
    return (FOLD_ORDER[m.stage], -index if m.stage == 'input' else index)

  return tuple(sorted(methods, key=key))


def method_from_peft(peft_type: str, settings) -> Method:
  """The registered method that PEFT's `peft_type` with these per-module settings stands for."""
  for cls in REGISTRY.values():
    if cls.peft_type == peft_type:
      method = cls.from_peft_settings(settings)
      if method is not None:
        return method
  raise ValueError(
    f'no registered adapter method reads PEFT {peft_type} adapters with settings {dict(settings)}; '
    f'methods with a PEFT form: { {n: c.peft_type for n, c in REGISTRY.items() if c.peft_type} }.'
  )


def from_json(d: dict) -> Method:
  """A method from its `to_json()` form (adapter checkpoints store plans this way)."""
  d = dict(d)
  cls = get_method(d.pop('method'))
  # JSON has no tuples: a tuple field comes back a list (unequal to the saved method, and unhashable).
  return cls(**{k: _tuples(v) for k, v in d.items()})


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


for _cls in (LoRA, Locon, IA3, IA3FF, Houlsby):
  register_method(_cls)

__all__ = [
  'IA3',
  'IA3FF',
  'LEAF_NAMES',
  'REGISTRY',
  'AdapterError',
  'Houlsby',
  'LoRA',
  'Locon',
  'Method',
  'classes_for_mode',
  'fold_order',
  'from_json',
  'get_method',
  'method_from_peft',
  'modes',
  'register_method',
  'sort_methods',
  'summary_groups',
  'unregister_method',
]
