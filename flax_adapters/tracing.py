"""Know each module's kind by tracing the model once, abstractly.

A 3-D kernel can be a Conv1D `(k, in, out)` or a DenseGeneral `(in, heads, head_dim)`; shapes alone
cannot tell. So the model's `init` is run under `jax.eval_shape` with a method interceptor
(`flax.linen.intercept_methods`, linen's official hook) that records, for every module call, its
class, its own parameters and how its kernel meets its input. The result is a `Site` per module: a
small hashable description that the adapter methods compute with.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from flax_adapters import paths as paths_lib
from flax_adapters import tree as tree_lib

KINDS = ('dense', 'dense_general', 'einsum', 'conv', 'conv_other', 'norm', 'embed', 'block')
LINEAR_KINDS = ('dense', 'dense_general', 'einsum')
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm, nn.InstanceNorm)
# Wrappers that rewrite the wrapped layer's weights before every use (through nn.map_variables).
_WEIGHT_REWRITERS = (nn.WeightNorm, nn.SpectralNorm)


_IDENTITY_MAP = inspect.signature(nn.map_variables).parameters['trans_in_fn'].default


def _maps_params(collections) -> bool:
  if collections is True or collections == 'params':
    return True
  return isinstance(collections, (list, tuple, set, frozenset)) and 'params' in collections


def _lifted_params_note(module) -> tuple[str, str] | None:
  """Why the layers inside a lifted transform see other params than the tree holds at their paths, as a
  Site option `(key, label)`, or None.

  nn.map_variables with a `trans_in_fn` on params (`weights_rewritten_by`), or nn.scan / nn.vmap stacking
  params on an axis other than the first (`params_stacked_by`). Linen keeps a lifted class's transform
  arguments only in its wrapped methods' closures.
  """
  if type(module).__module__ != 'flax.linen.transforms':
    return None
  for method in vars(type(module)).values():
    code, cells = getattr(method, '__code__', None), getattr(method, '__closure__', None)
    if code is None or not cells:
      continue
    closure = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    kwargs, args = closure.get('trafo_kwargs'), closure.get('trafo_args') or ()
    if not isinstance(kwargs, Mapping):
      continue
    if getattr(closure.get('transform'), '__name__', '') == 'map_variables':
      collections = kwargs.get('mapped_collections', args[0] if args else True)
      trans_in = kwargs.get('trans_in_fn', args[1] if len(args) > 1 else _IDENTITY_MAP)
      rewrites = _maps_params(collections) and trans_in is not _IDENTITY_MAP
      return ('weights_rewritten_by', 'map_variables') if rewrites else None
    axes = kwargs.get('variable_axes')
    if axes is None and args and isinstance(args[0], Mapping):  # nn.vmap passes it positionally
      axes = args[0]
    axis = axes.get('params') if isinstance(axes, Mapping) else None
    if isinstance(axis, int) and not isinstance(axis, bool) and axis != 0:
      return ('params_stacked_by', f"{type(module).__name__}, variable_axes={{'params': {axis}}}")
    return None
  return None


# Kernel axes are written in capitals (A, B, ...), free input/output axes in lowercase; the
# capitals 'Z' and 'Y' are reserved for an adapter's rank and bottleneck axes.
RANK = 'Z'
LATENT = 'Y'
_KERNEL_LETTERS = string.ascii_uppercase[:24]
_FREE_LETTERS = string.ascii_lowercase


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  if isinstance(value, np.ndarray):
    return tuple(value.tolist())
  return value


@dataclasses.dataclass(frozen=True)
class Contraction:
  """How one call meets its kernel, as einsum subscripts (`x`, `kernel` -> `y`)."""

  x: str
  kernel: str
  y: str


@dataclasses.dataclass(frozen=True)
class Site:
  """One module of a model, as the adapters see it.

  `kernel` is the kernel's subscripts in capitals; `feature_in` / `feature_out` are the kernel
  letters that meet input / output features (for a conv: `I` and `O`; for a block: `O` alone, the
  last axis of its output). `sizes` gives each letter's length.
  """

  path: tuple[str, ...]
  kind: str
  module_type: str
  # (name, shape, dtype) of the module's own parameter leaves.
  leaves: tuple[tuple[str, tuple[int, ...], str], ...] = ()
  kernel: str = ''
  feature_in: str = ''
  feature_out: str = ''
  # Subscripts of the bias (kernel letters that survive into the output, in output order).
  bias: str = ''
  sizes: tuple[tuple[str, int], ...] = ()
  # Kernel letters in neither role (e.g. an einsum batch axis over heads): no LoRA/IA3 possible.
  unsupported_letters: str = ''
  # False when weight deltas cannot be folded into the kernel (e.g. a weight-standardized conv).
  mergeable: bool = True
  # Kind-specific facts needed at call time: DenseGeneral's axis, Einsum's string, Conv geometry.
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def name(self) -> str:
    return paths_lib.dotted(self.path)

  def size(self, letters: str) -> tuple[int, ...]:
    sizes = dict(self.sizes)
    return tuple(sizes[c] for c in letters)

  def option(self, key: str, default=None):
    return dict(self.options).get(key, default)

  def leaf_key(self, name: str) -> str:
    """The params key of the canonical leaf `name` ('kernel', 'bias'): Haiku's 'w'/'b' on bare trees."""
    return dict(self.option('leaf_names', ())).get(name, name)

  @property
  def kernel_shape(self) -> tuple[int, ...] | None:
    for name, shape, _ in self.leaves:
      if name == self.leaf_key('kernel'):
        return shape
    return None

  @property
  def kernel_dtype(self):
    for name, _, dtype in self.leaves:
      if name == self.leaf_key('kernel'):
        return jnp.dtype(dtype)
    return None

  def describe(self) -> str:
    return f'{self.name} ({self.module_type}, {self.kind})'

  # -- subscripts for one call ---------------------------------------------------------------

  def contraction(self, x_ndim: int, y_ndim: int, call_kwargs: Mapping[str, Any] | None = None) -> Contraction:
    """Einsum subscripts relating input, kernel and output for a call with these ranks."""
    if self.kind == 'dense':
      free = _FREE_LETTERS[: x_ndim - 1]
      return Contraction(free + self.feature_in, self.kernel, free + self.feature_out)
    if self.kind == 'dense_general':
      axes = _normalize_axes(self.option('axis'), x_ndim)
      n_in = len(axes)
      xs = list(_FREE_LETTERS[:x_ndim])
      for ax, letter in zip(axes, self.kernel[:n_in]):
        xs[ax] = letter
      free = ''.join(c for c in xs if c.islower())
      return Contraction(''.join(xs), self.kernel, free + self.kernel[n_in:])
    if self.kind == 'einsum':
      einsum_str = (call_kwargs or {}).get('einsum_str') or self.option('einsum_str')
      return _einsum_contraction(einsum_str, x_ndim, y_ndim)[0]
    if self.kind in ('conv', 'block', 'norm', 'embed', 'conv_other'):
      free = _FREE_LETTERS[: y_ndim - 1]
      return Contraction(_FREE_LETTERS[: x_ndim - 1] + (self.feature_in or 'x'), self.kernel, free + self.feature_out)
    raise ValueError(f'no contraction for module kind {self.kind!r} at {self.name}.')


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


def _einsum_contraction(einsum_str: str, x_ndim: int, y_ndim: int):
  """Relabel an Einsum module's equation: kernel letters -> capitals, free letters -> lowercase."""
  einsum_str = einsum_str.replace(' ', '')
  lhs, ys = einsum_str.split('->')
  xs, ks = lhs.split(',')
  if '...' in ks:
    raise ValueError(f'Einsum kernels with an ellipsis are not supported: {einsum_str!r}.')
  mapping = {c: _KERNEL_LETTERS[i] for i, c in enumerate(dict.fromkeys(ks))}
  free = iter(_FREE_LETTERS)
  for c in dict.fromkeys(xs.replace('.', '') + ys.replace('.', '')):
    if c not in mapping:
      mapping[c] = next(free)
  n_ellipsis = x_ndim - len(xs.replace('...', ''))
  ellipsis = ''.join(next(free) for _ in range(max(n_ellipsis, 0)))

  def expand(s):
    head, dots, tail = s.partition('...')
    return ''.join(mapping[c] for c in head) + (ellipsis if dots else '') + ''.join(mapping[c] for c in tail)

  return Contraction(expand(xs), expand(ks), expand(ys)), mapping


def call_kwargs_of(kind: str, args, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
  """The call's keyword arguments, with an nn.Einsum's `einsum_str` given positionally moved into them."""
  if kind == 'einsum' and len(args) > 1 and isinstance(args[1], str) and 'einsum_str' not in kwargs:
    return {**kwargs, 'einsum_str': args[1]}
  return kwargs


def module_kind(module: nn.Module) -> str:
  """The kind of a linen module: declared by an `adapter_kind` class attribute, else by class."""
  declared = getattr(type(module), 'adapter_kind', None)
  if declared is not None:
    if declared not in KINDS:
      raise ValueError(f'{type(module).__name__}.adapter_kind is {declared!r}; expected one of {list(KINDS)}.')
    return declared
  if isinstance(module, nn.Dense):
    return 'dense'
  if isinstance(module, nn.DenseGeneral):
    return 'dense_general'
  if isinstance(module, nn.Einsum):
    return 'einsum'
  if isinstance(module, nn.Conv):
    return 'conv'
  if isinstance(module, (nn.ConvTranspose, nn.ConvLocal)):
    return 'conv_other'
  if isinstance(module, _NORMS):
    return 'norm'
  if isinstance(module, nn.Embed):
    return 'embed'
  return 'block'


_CONV_FIELDS = (
  'kernel_size',
  'strides',
  'padding',
  'input_dilation',
  'kernel_dilation',
  'feature_group_count',
  'precision',
)


def _own_leaves(module: nn.Module) -> tuple[tuple[str, tuple[int, ...], str], ...]:
  params = module.variables.get('params', {}) if module.scope is not None else {}
  # At init, nn.with_partitioning's params come boxed (nn.Partitioned); apply gets the plain arrays.
  params = nn.meta.unbox(params)
  return tuple(
    (name, tuple(v.shape), str(jnp.dtype(v.dtype))) for name, v in sorted(params.items()) if not isinstance(v, Mapping)
  )


def make_site(module: nn.Module, kind: str, x_ndim: int, y, call_kwargs: Mapping[str, Any]) -> Site:
  """Describe one called module (kernel subscripts, feature letters, geometry)."""
  path = tuple(module.scope.path)
  leaves = _own_leaves(module)
  shapes = {name: shape for name, shape, _ in leaves}
  common = dict(
    path=path,
    kind=kind,
    module_type=type(module).__name__,
    leaves=leaves,
    mergeable=bool(getattr(type(module), 'adapter_mergeable', True)),
  )
  kernel_shape = shapes.get('kernel')
  if kind in LINEAR_KINDS and kernel_shape is not None:
    options, odd = (), ''
    if kind == 'dense':
      ks, fin, fout = 'AB', 'A', 'B'
      bias = fout
      if len(kernel_shape) != 2:
        raise ValueError(f'{paths_lib.dotted(path)}: a Dense kernel must be 2-D, found shape {kernel_shape}.')
    elif kind == 'dense_general':
      axis = _hashable(getattr(module, 'axis', -1))
      n_in = len(_normalize_axes(axis, max(x_ndim, 1)))
      if getattr(module, 'batch_dims', ()):
        options = (('axis', axis), ('batch_dims', _hashable(module.batch_dims)))
        ks = _KERNEL_LETTERS[: len(kernel_shape)]
        return Site(**common, kernel=ks, sizes=tuple(zip(ks, kernel_shape)), unsupported_letters=ks, options=options)
      ks = _KERNEL_LETTERS[: len(kernel_shape)]
      fin, fout = ks[:n_in], ks[n_in:]
      bias = fout
      options = (('axis', axis),)
    else:
      einsum_str = call_kwargs.get('einsum_str') or module.einsum_str
      if not isinstance(einsum_str, str):
        raise ValueError(
          f'{paths_lib.dotted(path)} ({type(module).__name__}) has no einsum equation: set `einsum_str` on the '
          'module or pass it to its call.'
        )
      c, _ = _einsum_contraction(einsum_str, x_ndim, np.ndim(y))
      ks = c.kernel
      fin = ''.join(k for k in ks if k in c.x and k not in c.y)
      fout = ''.join(k for k in ks if k in c.y and k not in c.x)
      options = (('einsum_str', einsum_str.replace(' ', '')),)
      odd = ''.join(k for k in ks if k not in fin + fout)
      bias = ''.join(k for k in c.y if k in ks)
    return Site(
      **common,
      kernel=ks,
      feature_in=fin,
      feature_out=fout,
      bias=bias,
      sizes=tuple(zip(ks, kernel_shape)),
      unsupported_letters=odd,
      options=options,
    )
  if kind == 'conv' and kernel_shape is not None:
    n_spatial = len(kernel_shape) - 2
    ks = _KERNEL_LETTERS[:n_spatial] + 'IO'
    options = tuple((f, _hashable(getattr(module, f, None))) for f in _CONV_FIELDS)
    if getattr(module, 'mask', None) is not None:
      options += (('kernel_mask', True),)
    return Site(
      **common,
      kernel=ks,
      feature_in='I',
      feature_out='O',
      bias='O',
      sizes=tuple(zip(ks, kernel_shape)),
      options=options,
    )
  # Blocks, norms and anything else: the last output axis is the feature axis.
  out_dim = (
    int(np.shape(y)[-1]) if isinstance(y, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) and np.ndim(y) else None
  )
  sizes = (('O', out_dim),) if out_dim is not None else ()
  return Site(
    **common,
    feature_out='O' if out_dim is not None else '',
    sizes=sizes,
    options=(('output', 'array' if out_dim is not None else type(y).__name__),),
  )


@dataclasses.dataclass(frozen=True)
class Trace:
  """What tracing a model found: its abstract variables and one `Site` per called module."""

  variables: Any
  sites: Mapping[tuple[str, ...], Site]

  @property
  def params(self):
    return self.variables.get('params', {})


def _first_array(args):
  for a in args:
    if hasattr(a, 'ndim') and hasattr(a, 'shape'):
      return a
  return None


# Per module path, how deep the current call is in nested `__call__`s at that path: a subclass's
# `__call__` that calls `super().__call__` is intercepted again on the same module, and a module that
# shares its scope with a submodule (nn.share_scope) calls that submodule at its own path.
_CALL_DEPTHS: contextvars.ContextVar[dict | None] = contextvars.ContextVar('flax_adapters_call_depths', default=None)


@contextlib.contextmanager
def nested_call(module):
  """Count one more `__call__` at `module`'s path in progress; yields its depth (1 for the outermost)."""
  depths = _CALL_DEPTHS.get() or {}
  key = tuple(module.scope.path) if module.scope is not None else id(module)
  depth = depths.get(key, 0) + 1
  token = _CALL_DEPTHS.set({**depths, key: depth})
  try:
    yield depth
  finally:
    _CALL_DEPTHS.reset(token)


def trace_model(model: nn.Module, *args, rngs=None, kinds: Mapping[str, str] | None = None, **kwargs) -> Trace:
  """Trace `model.init(rngs, *args, **kwargs)` abstractly and describe every module it calls.

  Nothing is computed: inputs may be `jax.ShapeDtypeStruct`s. `kinds` overrides the detected kind
  of modules whose dotted path a target matches (`{'my_linear': 'dense'}`).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> t = trace_model(nn.Dense(3), jnp.ones((1, 4)))
    >>> t.sites[()].kind, t.sites[()].kernel_shape
    ('dense', (4, 3))
  """
  kinds = _check_kinds_targets(kinds)
  for target, forced in kinds.items():
    if not isinstance(forced, str) or forced not in KINDS:
      raise ValueError(
        f'`kinds` gives {target!r} the kind {forced!r}; a linen model takes one of {list(KINDS)} (tuple hints such '
        "as ('dense_general', n) or ('stacked', n, kind) describe bare params trees; nn.scan / nn.vmap stacks "
        'are found from the params).'
      )
  sites: dict[tuple[str, ...], Site] = {}
  rewriting: list[str] = []  # weight-rewriting wrappers (WeightNorm, SpectralNorm) now running
  lifted: dict[tuple[str, ...], tuple[str, str]] = {}  # lifted transforms changing their layers' params

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if module.scope is None:
      return next_fun(*call_args, **call_kwargs)
    note = _lifted_params_note(module)
    if note:  # the layers below this module see other params than the tree holds at their paths
      # Its intercepted call runs in the parent's scope, before it binds its own: add its name.
      own = tuple(module.scope.path)
      if module.name is not None and own[-1:] != (module.name,):
        own += (module.name,)
      lifted[own] = note
    if context.method_name != '__call__':
      return next_fun(*call_args, **call_kwargs)
    # Layers called inside WeightNorm / SpectralNorm see other weights than the params tree holds.
    wrapper = isinstance(module, _WEIGHT_REWRITERS)
    if wrapper:
      rewriting.append(type(module).__name__)
    try:
      # The innermost of nested calls records its site first, with its depth.
      with nested_call(module) as depth:
        out = next_fun(*call_args, **call_kwargs)
    finally:
      if wrapper:
        rewriting.pop()
    path = tuple(module.scope.path)
    kind = module_kind(module)
    for target, forced in kinds.items():
      if paths_lib.matches(target, path):
        kind = forced
    x = _first_array(call_args)
    x_ndim = x.ndim if x is not None else 0
    site = make_site(module, kind, x_ndim, out, call_kwargs_of(kind, call_args, call_kwargs))
    if depth > 1:
      site = dataclasses.replace(site, options=site.options + (('call_depth', depth),))
    if rewriting and not wrapper:
      site = dataclasses.replace(site, options=site.options + (('weights_rewritten_by', rewriting[-1]),))
    previous = sites.get(path)
    if previous is not None and previous != site:
      # A module called twice with different geometry (e.g. two input ranks) keeps the first, unless
      # its calls give its kernel axes different roles (an Einsum kernel used transposed the second
      # time): then no one adapter fits every call.
      roles = ('kernel', 'feature_in', 'feature_out', 'bias', 'unsupported_letters')
      if previous.kind == site.kind and previous.kind in LINEAR_KINDS and previous.option('calls_disagree') is None:
        if any(getattr(previous, r) != getattr(site, r) for r in roles):
          how = f'{previous.option("einsum_str", "")!r} and {site.option("einsum_str", "")!r}'
          sites[path] = dataclasses.replace(previous, options=previous.options + (('calls_disagree', how),))
      return out
    sites[path] = site
    return out

  if rngs is None:
    rngs = jax.random.key(0)
  if not isinstance(rngs, Mapping):
    rngs = {'params': rngs, 'dropout': rngs}

  # Arrays and ShapeDtypeStructs are traced; anything else (flags such as train=False) stays static.
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(l, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for l in leaves]

  def init(dynamic):
    it = iter(dynamic)
    a, kw = jax.tree.unflatten(treedef, [next(it) if arr else l for l, arr in zip(leaves, is_array)])
    with nn.intercept_methods(interceptor):
      return model.init(rngs, *a, **kw)

  variables = nn.meta.unbox(jax.eval_shape(init, [l for l, arr in zip(leaves, is_array) if arr]))
  for path, site in sites.items():
    # The layers run inside the transform, after its own (intercepted) call returned: match by path.
    notes = dict(lifted[path[:i]] for i in range(len(path) + 1) if path[:i] in lifted)
    notes = {k: v for k, v in notes.items() if site.option(k) is None}
    if notes:
      sites[path] = dataclasses.replace(site, options=site.options + tuple(notes.items()))
  _refuse_unmatched_kinds(kinds, sites)
  return Trace(variables=variables, sites=sites)


def _check_kinds_targets(kinds) -> dict:
  if kinds is None:
    return {}
  if not isinstance(kinds, Mapping):
    raise TypeError(
      f"`kinds` must be a mapping {{target: kind}}, e.g. {{'conv1': 'conv'}}; found {type(kinds).__name__}."
    )
  for target in kinds:
    paths_lib.check_target(target, 'kinds')
  return dict(kinds)


def _refuse_unmatched_kinds(kinds: Mapping[str, Any], paths) -> None:
  """A `kinds` hint that selects no module is a typo or a stale path: the module it meant keeps its
  detected kind, so say so instead of adapting it as something else."""
  for target in kinds:
    if not any(paths_lib.matches(target, p) for p in paths):
      raise ValueError(
        f'`kinds` target {paths_lib.describe_target(target)!r} matches no module. Nearest module paths: '
        f"{paths_lib.near_misses(target, paths)}. Targets are substrings of dotted paths, or 're:<regex>'."
      )


# -- bare params trees (no linen model to trace) -----------------------------------------------


class _ParamsModule:
  """Just enough of a linen module for `make_site` to describe a bare params dict."""

  class _Scope:
    def __init__(self, path):
      self.path = path

  def __init__(self, path, leaves, kind, n_in):
    self.scope = self._Scope(path)
    self.variables = {'params': leaves}
    self.axis = tuple(range(-(n_in or 1), 0))
    self.batch_dims = ()
    self.kernel_size = tuple(np.shape(leaves['kernel'])[:-2]) if kind == 'conv' else None
    self.strides = 1
    self.padding = 'SAME'
    self.input_dilation = 1
    self.kernel_dilation = 1
    self.feature_group_count = 1
    self.precision = None


# Haiku's names for a layer's kernel and bias (hk.Linear, hk.ConvND: `w` laid out like flax's kernel).
_HAIKU_LEAVES = {'w': 'kernel', 'b': 'bias'}


def _haiku_names(leaves: Mapping[str, Any]) -> dict[str, str]:
  """`{their name: ours}` for a Haiku layer dict (`w`, optional `b`, no `kernel`/`bias`), else {}."""
  if 'w' not in leaves or 'kernel' in leaves or 'bias' in leaves:
    return {}
  return {k: v for k, v in _HAIKU_LEAVES.items() if k in leaves}


def _unstacked(path, hint, leaves: Mapping[str, Any]):
  """`(inner hint, leaves without their stacked axes)` for a `('stacked', n_axes, kind)` hint, else as given."""
  if not (isinstance(hint, tuple) and hint and hint[0] == 'stacked'):
    return hint, leaves
  where = f'`kinds` gives {paths_lib.dotted(path)!r} {hint!r}'
  if len(hint) != 3 or isinstance(hint[1], bool) or not isinstance(hint[1], int) or hint[1] < 1:
    raise ValueError(f"{where}; expected ('stacked', n_stacked_axes >= 1, kind), e.g. ('stacked', 1, 'dense').")
  n, inner = hint[1], hint[2]
  if isinstance(inner, tuple) and inner and inner[0] == 'stacked':
    raise ValueError(f"{where}; give every stacked axis in one hint: ('stacked', n_axes, kind).")
  stacks = {k: tuple(np.shape(v))[:n] for k, v in leaves.items()}
  if any(np.ndim(v) < n for v in leaves.values()) or len(set(stacks.values())) > 1:
    raise ValueError(
      f'{where}, but its leaves do not share {n} leading stacked axes: '
      + ', '.join(f'{k} {tuple(np.shape(v))}' for k, v in sorted(leaves.items()))
      + '. Lower n_stacked_axes or target the stacked layers only.'
    )
  return inner, {k: jax.ShapeDtypeStruct(np.shape(v)[n:], jnp.result_type(v)) for k, v in leaves.items()}


def _conv_groups(path, hint, kernel) -> int:
  """The feature_group_count of a `('conv', {'feature_group_count': g})` hint, checked against the kernel."""
  where = f'`kinds` gives {paths_lib.dotted(path)!r} {hint!r}'
  options = hint[1] if len(hint) == 2 else None
  if not isinstance(options, Mapping) or set(options) != {'feature_group_count'}:
    raise ValueError(
      f"{where}; a conv hint is 'conv', or ('conv', {{'feature_group_count': g}}) for a grouped conv "
      '(a bare kernel (*window, in // g, out) does not say its groups).'
    )
  groups = options['feature_group_count']
  if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
    raise ValueError(f'{where}; feature_group_count must be a positive int, found {groups!r}.')
  if np.ndim(kernel) < 3 or np.shape(kernel)[-1] % groups:
    raise ValueError(
      f'{where}, but its kernel {tuple(np.shape(kernel))} has {np.shape(kernel)[-1]} output features, not a '
      f'multiple of {groups} groups (a grouped conv kernel is (*window, in // groups, out)).'
    )
  return int(groups)


def trace_params(params, kinds: Mapping[str, Any] | None = None) -> Trace:
  """Describe the layers of a bare params tree (NNX state, Equinox, Haiku, ...: no linen model).

  A dict holding a `kernel` (Haiku: `w`, with its bias `b`) is a layer: 2-D kernels are Dense; other
  ranks need a hint in `kinds` (`'conv'`, `('conv', {'feature_group_count': g})` for a grouped or
  depthwise conv, or `('dense_general', n_input_axes)`). A dict with a
  `scale` and no kernel is a norm (all its leaves but running statistics train with
  `unfreeze_norm`, Haiku's `offset` included); one with an `embedding` an embed; any other dict of
  leaves a block, which `modules_to_save` can name. Layers stacked on leading axes (`nnx.vmap`,
  `nnx.scan`, a kernel `(layers, in, out)`) take `('stacked', n_stacked_axes, kind)`: each stacked
  layer gets its own adapter, initialised from its own key, and folds into its own kernel.

  Examples:
    >>> import jax.numpy as jnp
    >>> tree = {'fc': {'kernel': jnp.ones((4, 3))}, 'ln': {'scale': jnp.ones(3)}, 'emb': {'embedding': jnp.ones((5, 3))}}
    >>> t = trace_params(tree)
    >>> t.sites[('fc',)].kind, t.sites[('ln',)].kind, t.sites[('emb',)].kind
    ('dense', 'norm', 'embed')
  """
  tree_lib.refuse_nnx_state(params)
  if not isinstance(params, Mapping):
    raise TypeError(f'`params` must be a nested dict of arrays, found {type(params).__name__}.')
  kinds = _check_kinds_targets(kinds)
  sites = {}
  flat = traverse_util.flatten_dict(params)
  for key, value in flat.items():
    if value is not None and not hasattr(value, 'shape') and not isinstance(value, (int, float, complex)):
      raise TypeError(
        f'`params` must be nested dicts of arrays, but {paths_lib.raw(key)} is a {type(value).__name__}. '
        'Convert lists/tuples of layers to dicts keyed by index ({0: ..., 1: ...}, as nnx.to_pure_dict does).'
      )
    if value is None:
      raise TypeError(f'`params` has None at {paths_lib.raw(key)}; drop absent leaves (e.g. a missing bias).')
  for path in sorted({k[:-1] for k in flat}, key=lambda p: tuple(map(str, p))):
    node = params
    for key in path:
      node = node[key]
    leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
    hint = None
    for target, kind in kinds.items():
      if paths_lib.matches(target, path):
        hint = kind
    hint, leaves = _unstacked(path, hint, leaves)
    base_hint = hint[0] if isinstance(hint, tuple) else hint
    if base_hint is not None and base_hint not in KINDS:
      raise ValueError(f'`kinds` gives {paths_lib.dotted(path)!r} the kind {hint!r}; expected one of {list(KINDS)}.')
    if base_hint == 'einsum':
      raise ValueError(
        f'`kinds` says {paths_lib.dotted(path)!r} is an einsum, but a bare params tree has no einsum equation; '
        "describe its kernel as ('dense_general', n_input_axes) when its leading axes meet the input and the rest "
        'the output (e.g. nnx.Einsum("btd,dhk->bthk"): (\'dense_general\', 1)).'
      )
    aliases = _haiku_names(leaves)
    leaves = {aliases.get(k, k): v for k, v in leaves.items()}
    kernel = leaves.get('kernel')
    if kernel is None and base_hint in ('dense', 'dense_general', 'conv'):
      raise ValueError(
        f'`kinds` says {paths_lib.dotted(path)!r} is {base_hint!r}, but it has no `kernel` leaf (it holds '
        f'{sorted(map(str, leaves))}). A `kinds` target matches every path containing it: narrow it to the '
        "layers (e.g. 'layers.fc', not 'layers'). A layer of a bare tree holds its kernel as `kernel` (flax, NNX) "
        'or `w` (Haiku), laid out (*inputs, outputs); transpose a torch-layout `weight` ([out, in]) into a `kernel`.'
      )
    if kernel is None:
      if not leaves:
        continue
      # Named by modules_to_save (an nnx.Embed, nnx.LoRALinear's `lora`, a bias-only Haiku module) even
      # without a kernel; rules for layer kinds pass them by.
      kind = hint or ('norm' if 'scale' in leaves else 'embed' if 'embedding' in leaves else 'block')
      sites[path] = Site(
        path=path,
        kind=kind,
        module_type='params',
        leaves=tuple((n, tuple(np.shape(v)), str(jnp.result_type(v))) for n, v in sorted(leaves.items())),
      )
      continue
    if hint is None:
      if np.ndim(kernel) != 2:
        raise ValueError(
          f'the kernel at {paths_lib.dotted(path)!r} is {np.ndim(kernel)}-D {tuple(np.shape(kernel))}; say what it '
          f"is in `kinds`: {{'{paths_lib.dotted(path)}': 'conv'}}, ('dense_general', n_input_axes), or, for layers "
          "stacked on leading axes (nnx.vmap, nnx.scan: kernel (layers, in, out)), ('stacked', 1, 'dense')."
        )
      hint = 'dense'
    n_in, groups = None, 1
    if isinstance(hint, tuple) and hint[0] == 'conv':
      groups = _conv_groups(path, hint, kernel)
      hint = 'conv'
    if isinstance(hint, tuple):
      hint, n_in = hint
      if isinstance(n_in, bool) or not isinstance(n_in, int) or not 1 <= n_in < np.ndim(kernel):
        raise ValueError(
          f'`kinds` gives {paths_lib.dotted(path)!r} {(hint, n_in)!r}; n_input_axes must be an int in '
          f'[1, {np.ndim(kernel) - 1}] for its {np.ndim(kernel)}-D kernel {tuple(np.shape(kernel))}.'
        )
    if hint == 'conv' and np.ndim(kernel) < 3:
      raise ValueError(
        f'`kinds` says {paths_lib.dotted(path)!r} is a conv, but its kernel is {np.ndim(kernel)}-D (a conv kernel is (*window, in, out)).'
      )
    module = _ParamsModule(path, leaves, hint, n_in)
    module.feature_group_count = groups
    x_ndim = (n_in or 1) + 1 if hint != 'conv' else np.ndim(kernel)
    y = jax.ShapeDtypeStruct((1,) * (x_ndim - (n_in or 1)) + tuple(np.shape(kernel)[(n_in or 1) :]), kernel.dtype)
    site = make_site(module, hint, x_ndim, y, {})
    if aliases:  # record the tree's own names: the leaves as they are keyed, and which is the kernel/bias
      back = {v: k for k, v in aliases.items()}
      site = dataclasses.replace(
        site,
        leaves=tuple((back.get(n, n), shape, dtype) for n, shape, dtype in site.leaves),
        options=site.options + (('leaf_names', tuple(sorted(back.items()))),),
      )
    sites[path] = site
  _refuse_unmatched_kinds(kinds, {k[:-1] for k in flat})
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)), params)
  return Trace(variables={'params': abstract}, sites=sites)
