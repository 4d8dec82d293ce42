"""The one protocol every adapter method follows.

A method is a frozen dataclass of its hyperparameters (rank, scale, ...) with pure array math:

- `check(site)`: raise a clear error if it cannot adapt this module;
- `init(rng, site, dtype)`: its new leaves, which live in the module's params dict;
- `apply(site, leaves, x, y, call, rng=None)`: its effect on a call, at its `stage`
  (`rng` is given during training when the method `needs_rng`, e.g. for dropout):
  `'input'` rescales the input before the module runs, `'additive'` adds a delta computed from
  the input, `'output'` transforms the module's output;
- `fold(site, leaves, module_params)`: the module's params with the adapter folded into the
  kernel, or `None` when it cannot be folded (then it stays and keeps running factored);
- `count(site)`: the number of parameters it adds (the analytic formula the tests check);
- `layout(site)`: each leaf's axes named by the kernel letters they share, so a leaf is sharded
  like the kernel axes it follows (the rank and bottleneck axes are replicated).

Folding order differs from forward order: additive deltas fold first, then input scales (which
also scale the delta), then output scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.tracing import Contraction, Site

Array = jax.Array
FOLD_ORDER = {'additive': 0, 'input': 1, 'output': 2}


class AdapterError(ValueError):
  """An adapter cannot be placed or run where it was asked for."""


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class of adapter methods (see the module docstring for the protocol)."""

  name: ClassVar[str]
  leaf_names: ClassVar[tuple[str, ...]]
  stage: ClassVar[str]
  # Modes of TransferConfig that create it (for summaries and trainable grouping).
  group: ClassVar[str]

  def check(self, site: Site) -> None:
    raise NotImplementedError

  def init(self, rng: Array, site: Site, dtype) -> dict[str, Array]:
    raise NotImplementedError

  def apply(
    self,
    site: Site,
    leaves: Mapping[str, Array],
    x: Array,
    y: Array | None,
    call: Contraction,
    rng: Array | None = None,
  ) -> Array:
    raise NotImplementedError

  @property
  def needs_rng(self) -> bool:
    """Whether `apply` draws randomness (dropout) when the caller provides the rng stream."""
    return False

  def fold(
    self, site: Site, leaves: Mapping[str, Array], module_params: Mapping[str, Array]
  ) -> dict[str, Array] | None:
    return None

  def count(self, site: Site) -> int:
    return int(sum(np.prod(s) for s in self.shapes(site).values()))

  def shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    raise NotImplementedError

  def layout(self, site: Site) -> dict[str, str]:
    """Each leaf's axes as letters: kernel letters share the kernel's sharding; others replicate."""
    raise NotImplementedError

  def to_json(self) -> dict[str, Any]:
    return {'method': self.name, **dataclasses.asdict(self)}


def require_kernel_letters(method: str, site: Site) -> None:
  """Linear-algebra adapters need every kernel axis to be an input or an output feature axis."""
  if site.unsupported_letters:
    raise AdapterError(
      f'{method} cannot adapt {site.describe()}: kernel axes {site.unsupported_letters!r} of '
      f'{site.kernel!r} are neither contracted with the input nor output features (e.g. an '
      'Einsum batch axis, or DenseGeneral batch_dims). Target a different layer.'
    )


def broadcast_to(v: Array, v_sub: str, target_sub: str) -> Array:
  """Lay out `v` (subscripts `v_sub`) to broadcast against an array with subscripts `target_sub`."""
  order = ''.join(c for c in target_sub if c in v_sub)
  if order != v_sub:
    v = jnp.einsum(f'{v_sub}->{order}', v)
  sizes = dict(zip(order, v.shape))
  return v.reshape(tuple(sizes.get(c, 1) for c in target_sub))


def compute_dtype(x: Array, y: Array | None):
  return (y if y is not None else x).dtype


def kaiming_uniform(rng: Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
  """uniform(±1/sqrt(fan_in)): torch's kaiming_uniform_(a=sqrt(5)), what PEFT uses for lora_A."""
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(rng, shape, dtype, -bound, bound)
