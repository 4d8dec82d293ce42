"""The one protocol every adapter method follows: a method is a complete plugin.

A method is a frozen, keyword-only dataclass of its hyperparameters (rank, scale, ...) whose class
declares everything the pipeline needs, so nothing outside `methods/` names a method:

- where it goes: `kinds` (the module kinds it adapts, see `tracing.KINDS`) and `topmost` (take
  only the outermost of nested matches, for blocks); `placement_kinds()` may refine both per instance;
- what it adds: `leaf_names`, `shapes(site)`, `init(rng, site, dtype)`, `layout(site)` (each leaf's
  axes named by the kernel letters they share, so a leaf is sharded like those kernel axes);
- how it runs: `stage` — `'input'` rescales the input before the module runs, `'additive'` adds a
  delta computed from the input, `'output'` transforms the module's output — and
  `apply(site, leaves, x, y, call, rng=None)` (`rng` is given in training when `needs_rng`);
- whether it folds: `fold(site, leaves, module_params)` returns the module's params with the
  adapter folded in, or `None`; then `fold_refusal(site)` says why, in words; `weight_space`
  is False for methods that need the module's output (they cannot run on a bare params tree);
- how users see it: `group` (its row in `param_summary`) and `mode` (the `TransferConfig` mode
  that creates it; `rules_from_config` compiles the config's fields into placement rules);
- how PEFT sees it: `peft_type` (`None` when PEFT cannot hold it; then `peft_refusal` says why),
  `to_peft`/`from_peft` between its leaves and PEFT's tensors and per-module settings.

`check(site)` raises a clear error when it cannot adapt a module. Register a new method with
`flax_adapters.register_method` (see `methods/__init__.py`).

Folding order differs from forward order: additive deltas fold first, then input transforms (which
also act on the delta; innermost first, i.e. in reverse forward order), then output transforms.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.tracing import Contraction, Site

Array = jax.Array
STAGES = ('input', 'additive', 'output')
FOLD_ORDER = {'additive': 0, 'input': 1, 'output': 2}
# Adapter leaves are created from shapes alone; refuse one bigger than this before allocating it.
MAX_LEAF_ELEMENTS = 2**32

# Set while an adapter runs linen modules of its own, so the adapted forward leaves them alone.
BYPASS = contextvars.ContextVar('flax_adapters_bypass', default=False)


@contextlib.contextmanager
def bypass_interceptor():
  token = BYPASS.set(True)
  try:
    yield
  finally:
    BYPASS.reset(token)


class AdapterError(ValueError):
  """An adapter cannot be placed or run where it was asked for."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """Base class of adapter methods (see the module docstring for the protocol)."""

  name: ClassVar[str]
  leaf_names: ClassVar[tuple[str, ...]]
  stage: ClassVar[str]
  # Module kinds it adapts, and whether only the outermost of nested matches (blocks).
  kinds: ClassVar[tuple[str, ...]] = ()
  topmost: ClassVar[bool] = False
  # Row of `param_summary`; defaults to `name`.
  group: ClassVar[str | None] = None
  # The TransferConfig mode that creates it; defaults to `name` (None: only by explicit rules).
  mode: ClassVar[str | None] = None
  # False when it needs the module's output (it cannot be folded nor run on bare params).
  weight_space: ClassVar[bool] = True
  # PEFT's `peft_type` it is saved as, or None when PEFT cannot hold it.
  peft_type: ClassVar[str | None] = None

  # -- where it goes -----------------------------------------------------------------------------

  def placement_kinds(self) -> tuple[tuple[str, ...], bool]:
    """`(kinds, topmost)` for this instance (e.g. Houlsby's placement changes both)."""
    return self.kinds, self.topmost

  def check(self, site: Site) -> None:
    """Raise an `AdapterError` naming the layer and the fix if this method cannot adapt `site`."""

  # -- what it adds ------------------------------------------------------------------------------

  def shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    raise NotImplementedError

  def init(self, rng: Array, site: Site, dtype) -> dict[str, Array]:
    raise NotImplementedError

  def layout(self, site: Site) -> dict[str, str]:
    """Each leaf's axes as letters: kernel letters share the kernel's sharding; others replicate.

    By default every leaf is replicated (`'_'` is no kernel letter); define it to shard large leaves.
    """
    return {leaf: '_' * len(shape) for leaf, shape in self.checked_shapes(site).items()}

  def count(self, site: Site) -> int:
    return int(sum(math.prod(s) for s in self.shapes(site).values()))

  def checked_shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    """`shapes(site)`, refused with the fix unless it maps exactly `leaf_names` to tuples of sizes."""
    shapes = self.shapes(site)
    where = f'{type(self).__name__}.shapes (method {self.name!r}) on {site.describe()}'
    if not isinstance(shapes, Mapping) or set(shapes) != set(self.leaf_names):
      got = sorted(shapes) if isinstance(shapes, Mapping) else type(shapes).__name__
      raise TypeError(f'{where} returned {got}; it must return a dict with one shape per leaf of {self.leaf_names}.')
    out = {}
    for leaf, shape in shapes.items():
      ok = isinstance(shape, (tuple, list)) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape
      )
      if not ok:
        raise TypeError(
          f'{where} gives {leaf!r} the shape {shape!r}; a shape is a tuple of sizes, e.g. (16,) not 16 '
          '(site.size(letters) returns one).'
        )
      out[leaf] = tuple(int(n) for n in shape)
    return out

  def check_size(self, site: Site) -> None:
    """Refuse leaves too large to allocate (and malformed `shapes`), before anything is allocated."""
    for leaf, shape in self.checked_shapes(site).items():
      if math.prod(shape) > MAX_LEAF_ELEMENTS:
        raise AdapterError(
          f'{self.name} on {site.describe()} would create {leaf} of shape {tuple(shape)} '
          f'({math.prod(shape):,} elements); check its size settings.'
        )

  # -- how it runs -------------------------------------------------------------------------------

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

  # -- folding -----------------------------------------------------------------------------------

  def fold(
    self, site: Site, leaves: Mapping[str, Array], module_params: Mapping[str, Array]
  ) -> dict[str, Array] | None:
    return None

  def fold_refusal(self, site: Site) -> str:
    """Why `fold` returns None for `site`, for error messages."""
    if not self.weight_space:
      return f'{self.name} is not a weight-space adapter (it transforms the module output)'
    if type(self).fold is Method.fold:
      return (
        f'{type(self).__name__} ({self.name}) defines no `fold`, so it cannot be folded into the weights; define '
        '`fold(site, leaves, module_params)` returning the params with it folded in'
      )
    return (
      f'{site.describe()} recomputes its kernel on every call (e.g. weight standardization), so a folded '
      f'{self.name} delta would be undone'
    )

  # -- users' views ------------------------------------------------------------------------------

  @classmethod
  def summary_group(cls) -> str:
    return cls.group or cls.name

  @classmethod
  def transfer_mode(cls) -> str | None:
    return cls.mode if 'mode' in vars(cls) else cls.name

  @classmethod
  def rules_from_config(cls, config) -> list:
    """The placement rules a `TransferConfig` asks of this method (its mode is in `config.modes`).

    The built-in methods read the config's AlphaGenome fields (`lora_rank`, `lora_targets`, ...);
    by default a method reads `config.options[name]`: `{'targets': [...], **constructor kwargs}`.
    """
    from flax_adapters.rules import Rule  # pylint: disable=g-import-not-at-top

    options = dict(config.options.get(cls.name, {}))
    targets = options.pop('targets', ())
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
      raise ValueError(
        f"`options[{cls.name!r}]['targets']` is empty but mode includes {cls.name!r}; name the modules, e.g. "
        f"options={{{cls.name!r}: {{'targets': ['fc2']}}}}."
      )
    try:
      method = cls(**options)
    except TypeError as e:
      raise TypeError(f'`options[{cls.name!r}]` does not fit {cls.__name__}: {e}.') from None
    return [Rule(target=t, methods=(method,), argument=f'options[{cls.name!r}]') for t in targets]

  def same_effect(self, other: Method) -> bool:
    """Whether `other` computes the same function (e.g. equal scales written with other settings)."""
    return self == other

  def to_json(self) -> dict[str, Any]:
    return {'method': self.name, **dataclasses.asdict(self)}

  # -- PEFT --------------------------------------------------------------------------------------

  def peft_refusal(self, site: Site) -> str:
    return (
      f'{site.name} has a {self.name} adapter, which PEFT has no format for. Fix: keep it as a flax adapter '
      'checkpoint (save_adapters), or export_merged if it folds'
    )

  def to_peft(self, site: Site, leaves: Mapping[str, Array]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT tensors `{key suffix: torch-layout array}` and this module's PEFT settings."""
    raise NotImplementedError

  def peft_shapes(self, site: Site) -> dict[str, tuple[int, ...]]:
    """The torch shapes of the tensors `to_peft` writes (what an imported file must hold)."""
    raise NotImplementedError

  @classmethod
  def from_peft_settings(cls, settings: Mapping[str, Any]) -> Method | None:
    """This method for a module with PEFT `settings`, or None if these settings are another method's."""
    return None

  def from_peft(self, site: Site, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Its leaves from PEFT's tensors (shapes already checked against `peft_shapes`)."""
    raise NotImplementedError


# -- shared checks and helpers --------------------------------------------------------------------


def check_positive_int(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'`{name}` must be a positive integer, found {value!r}.')


def check_positive_number(value: Any, name: str) -> None:
  """A finite number > 0 (inf and NaN would make every output NaN)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f'`{name}` must be a positive number, found {value!r}.')
  if not math.isfinite(value):
    raise ValueError(f'`{name}` must be a finite positive number, found {value!r} (it would make every output NaN).')
  if not value > 0:
    raise ValueError(f'`{name}` must be a positive number, found {value!r}.')


def check_dropout(value: Any, name: str) -> float:
  """A dropout rate in [0, 1) (Python or NumPy number), returned as a Python float."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value < 1:
    raise ValueError(f'`{name}` must be a number in [0, 1), found {value!r}.')
  return float(value)


def check_choice(value: Any, choices: Sequence[str], name: str, hint: str = '') -> None:
  if value not in choices:
    raise ValueError(f'`{name}` must be one of {list(choices)}, found {value!r}.{" " + hint if hint else ""}')


def require_float_kernel(method: str, site: Site) -> None:
  dtype = site.kernel_dtype
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise AdapterError(
      f'{method} cannot adapt {site.describe()}: its kernel is {dtype}, and a folded delta would be truncated '
      'to integers. Dequantize the kernel first.'
    )


def require_kernel_letters(method: str, site: Site) -> None:
  """Linear-algebra adapters need every kernel axis to be an input or an output feature axis."""
  require_float_kernel(method, site)
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


def kaiming_uniform(rng: Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
  """uniform(±1/sqrt(fan_in)): torch's kaiming_uniform_(a=sqrt(5)), what PEFT uses for lora_A."""
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(rng, shape, dtype, -bound, bound)


def fold_dtype(kernel) -> Any:
  """Folds are computed in at least float32 and cast back to the kernel's dtype."""
  return jnp.promote_types(kernel.dtype, jnp.float32)
