"""Adapter methods: one module of pure array math each, and the registry that orders them.

The registry order is the forward order within a call: input scales first, then additive deltas,
then output transforms (IA3 before the Houlsby bottleneck). A new method is one new file and one
line here.
"""

from flax_adapters.methods.base import FOLD_ORDER, AdapterError, Method
from flax_adapters.methods.houlsby import Houlsby
from flax_adapters.methods.ia3 import IA3, IA3FF
from flax_adapters.methods.locon import Locon
from flax_adapters.methods.lora import LoRA

REGISTRY: dict[str, type[Method]] = {
  'ia3_ff': IA3FF,
  'lora': LoRA,
  'locon': Locon,
  'ia3': IA3,
  'houlsby': Houlsby,
}
ORDER = {name: i for i, name in enumerate(REGISTRY)}
LEAF_NAMES = frozenset(name for cls in REGISTRY.values() for name in cls.leaf_names)


def sort_methods(methods):
  """Methods in forward order."""
  return tuple(sorted(methods, key=lambda m: ORDER[m.name]))


def fold_order(methods):
  """Methods in folding order: additive deltas, then input scales, then output scales."""
  return tuple(sorted(methods, key=lambda m: (FOLD_ORDER[m.stage], ORDER[m.name])))


def from_json(d: dict) -> Method:
  d = dict(d)
  cls = REGISTRY[d.pop('method')]
  return cls(**d)


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
  'fold_order',
  'from_json',
  'sort_methods',
]
