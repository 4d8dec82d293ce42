"""`prepare_for_transfer`: swap heads, place adapters, and say what trains.

It traces the model once (abstractly) to learn each module's kind, matches the config's targets
against dotted module paths, checks every placement (a target that matches nothing, a rank too
large for its layer, Locon on a grouped conv, ... are errors that name the layer and the fix),
and returns an `AdaptedModel` with params that hold the pretrained leaves unchanged plus the new
adapter leaves next to the kernels they adapt.

Heads protocol: a model takes part in head surgery if it has a field `heads` (a mapping, or a
tuple of `(name, spec)` pairs, from head name to `{'modality': str, 'num_tracks': int}`) and keeps
each head's parameters under `params['heads'][name]`. `model.clone(heads=...)` must build the
same trunk with other heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from flax_adapters import paths as paths_lib
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel, SitePlan, Trainable
from flax_adapters.methods import IA3, IA3FF, LEAF_NAMES, AdapterError, Houlsby, Locon, LoRA, sort_methods
from flax_adapters.methods.base import Method
from flax_adapters.tracing import LINEAR_KINDS, Site, trace_model

Path = tuple[str, ...]
HEADS_KEY = 'heads'


# -- params trees ----------------------------------------------------------------------------


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


def check_params_fit(params, abstract, *, argument: str = 'params') -> None:
  """Raise if `params` does not have the structure and shapes the model's init produces."""
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
  expected = traverse_util.flatten_dict(abstract)
  adapters = sorted('/'.join(k) for k in given if k[-1] in LEAF_NAMES and k not in expected)
  if adapters:
    raise ValueError(
      f'`{argument}` already holds adapter leaves ({", ".join(adapters[:4])}{", ..." if len(adapters) > 4 else ""}). '
      'Start from the base params, or merge_adapters first.'
    )
  missing = sorted('/'.join(k) for k in expected if k not in given)
  unexpected = sorted('/'.join(k) for k in given if k not in expected)
  wrong = [
    f'{"/".join(k)}: expected {tuple(expected[k].shape)}, found {tuple(np.shape(given[k]))}'
    for k in expected
    if k in given and tuple(np.shape(given[k])) != tuple(expected[k].shape)
  ]
  if missing or unexpected or wrong:
    lines = []
    if missing:
      lines.append(f'missing {len(missing)}: {", ".join(missing[:6])}{" ..." if len(missing) > 6 else ""}')
    if unexpected:
      lines.append(f'unexpected {len(unexpected)}: {", ".join(unexpected[:6])}{" ..." if len(unexpected) > 6 else ""}')
    if wrong:
      lines.append(f'wrong shape {len(wrong)}: {"; ".join(wrong[:6])}{" ..." if len(wrong) > 6 else ""}')
    raise ValueError(
      f'`{argument}` does not fit the model: '
      + ' | '.join(lines)
      + '. Pass the params this model was initialised or converted with (and the same config).'
    )


# -- heads -----------------------------------------------------------------------------------


def model_heads(model) -> dict[str, dict] | None:
  """The model's heads as `{name: spec}`, or None if it does not follow the heads protocol."""
  heads = getattr(model, 'heads', None)
  if heads is None:
    return None
  if isinstance(heads, Mapping):
    return {k: dict(v) for k, v in heads.items()}
  if isinstance(heads, Sequence) and all(isinstance(h, Sequence) and len(h) == 2 for h in heads):
    return {k: dict(v) for k, v in heads}
  raise TypeError(
    f'{type(model).__name__}.heads must map head names to specs (a dict or (name, spec) pairs), found {heads!r}.'
  )


def swap_heads(model: nn.Module, config: TransferConfig):
  """The model with the config's head surgery applied, and the names of its new heads."""
  current = model_heads(model)
  if current is None:
    raise TypeError(
      f'`remove_heads`/`keep_heads`/`new_heads` need a model with a `heads` field, but '
      f'{type(model).__name__} has none. Follow the heads protocol (see flax_adapters.surgery), or '
      'train your own output layer with `modules_to_save`.'
    )
  named = list(config.remove_heads) + list(config.keep_heads or ())
  unknown = [h for h in named if h not in current]
  if unknown:
    raise ValueError(
      f'head(s) {unknown} named in `remove_heads`/`keep_heads` do not exist; the model has heads {list(current)}.'
    )
  if config.keep_heads is not None:
    kept = [h for h in current if h in config.keep_heads]
  else:
    kept = [h for h in current if h not in config.remove_heads]
  clash = [h for h in config.new_heads if h in kept]
  if clash:
    raise ValueError(
      f'`new_heads` {clash} already exist in the model; remove them first (remove_heads={clash}) or choose new names.'
    )
  specs = {h: current[h] for h in kept}
  specs.update(config.new_heads)
  raw = model.heads
  heads = specs if isinstance(raw, Mapping) else tuple((k, dict(v)) for k, v in specs.items())
  return model.clone(heads=heads), kept, list(config.new_heads)


def _concrete(args):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, args)


def _fresh_heads(model, names, rng, args, kwargs):
  """Initialise only the named heads (jit + dead-code elimination skips the trunk's init)."""
  if not names:
    return {}

  def init(key):
    a, kw = _concrete((args, kwargs))
    params = model.init({'params': key, 'dropout': key}, *a, **kw)['params']
    return {h: params[HEADS_KEY][h] for h in names}

  return jax.jit(init)(rng)


# -- placing adapters ------------------------------------------------------------------------

_LINEAR_OR_CONV = LINEAR_KINDS + ('conv',)


def _kinds_for(method: Method) -> tuple[tuple[str, ...], bool]:
  """The module kinds a method can adapt, and whether it takes the topmost match only (blocks)."""
  if isinstance(method, LoRA):
    return LINEAR_KINDS, False
  if isinstance(method, Locon):
    return ('conv',), False
  if isinstance(method, Houlsby):
    return (('block',), True) if method.placement == 'block' else (LINEAR_KINDS, False)
  return _LINEAR_OR_CONV, False


def _requests(config: TransferConfig):
  """(method, targets, argument name) for each adapter the config asks for."""
  modes = config.adapter_modes
  out = []
  if 'lora' in modes:
    out.append(
      (
        LoRA(
          rank=config.lora_rank,
          alpha=config.lora_alpha,
          use_rslora=config.use_rslora,
          dropout=float(config.lora_dropout),
        ),
        config.lora_targets,
        'lora_targets',
      )
    )
  if 'locon' in modes:
    out.append((Locon(rank=config.locon_rank, alpha=config.locon_alpha), config.locon_targets, 'locon_targets'))
  if 'ia3' in modes:
    out.append((IA3(), config.ia3_targets, 'ia3_targets'))
    out.append((IA3FF(), config.ia3_ff_targets, 'ia3_ff_targets'))
  if 'houlsby' in modes:
    method = Houlsby(
      latent_dim=config.houlsby_latent_dim,
      placement=config.houlsby_placement,
      activation=config.houlsby_activation,
      init_scheme=config.houlsby_init,
    )
    out.append((method, config.houlsby_targets, 'houlsby_targets'))
  return out


def _topmost(paths: list[Path]) -> list[Path]:
  chosen = set(paths)
  return [p for p in paths if not any(p[:i] in chosen for i in range(len(p)))]


def select(sites: Mapping[Path, Site], target, argument: str, kinds=None, topmost=False) -> list[Path]:
  """Paths of sites that `target` matches (of the given kinds); errors if it matches nothing."""
  matched = [p for p in sites if paths_lib.matches(target, p)]
  if not matched:
    raise ValueError(
      f'`{argument}` entry {paths_lib.describe_target(target)!r} matches no module. Nearest module '
      f'paths: {paths_lib.near_misses(target, sites)}. Targets are substrings of dotted paths '
      "(linen's 'blocks_0' reads as 'blocks.0'), or 're:<regex>' matched against the whole path."
    )
  if kinds is not None:
    matched = [p for p in matched if sites[p].kind in kinds]
  return _topmost(matched) if topmost else matched


def place_adapters(sites: Mapping[Path, Site], requests) -> dict[Path, list[Method]]:
  """Which adapters go on which module, every placement checked.

  `requests` is a sequence of `(method, targets, argument_name)`; the argument name is what error
  messages blame.
  """
  placed: dict[Path, dict[str, tuple[Method, Any]]] = {}
  for method, targets, argument in requests:
    kinds, topmost = _kinds_for(method)
    for target in targets:
      every = select(sites, target, argument)
      fitting = select(sites, target, argument, kinds, topmost)
      if not fitting:
        # Let the method explain why the closest wrong module does not fit.
        wrong = sorted(every, key=lambda p: (sites[p].kind == 'block', len(p)))
        method.check(sites[wrong[0]])
        raise AdapterError(f'`{argument}` entry {target!r} matches no module that {method.name} can adapt.')
      for path in fitting:
        method.check(sites[path])
        previous = placed.setdefault(path, {}).get(method.name)
        if previous is not None:
          raise ValueError(
            f'{method.name} would be added twice to {paths_lib.dotted(path)}: both '
            f'{paths_lib.describe_target(previous[1])!r} and {paths_lib.describe_target(target)!r} in '
            f'`{argument}` match it. Each layer gets one adapter of each kind; make the targets disjoint.'
          )
        placed[path][method.name] = (method, target)
  return {path: list(sort_methods(m for m, _ in entries.values())) for path, entries in placed.items()}


def _adapter_dtype(adapter_dtype, site: Site, params: Mapping, path: Path):
  if adapter_dtype is not None:
    return jnp.dtype(adapter_dtype)
  dtype = site.kernel_dtype
  if dtype is None:
    leaves = [v for v in jax.tree.leaves(get_subtree(params, path)) if jnp.issubdtype(v.dtype, jnp.floating)]
    dtype = leaves[0].dtype if leaves else jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def stack_shape(path: Path, sites: Mapping[Path, Site], params) -> tuple[int, ...]:
  """Leading axes a module's params are stacked on in `params` (nn.scan / nn.vmap), else ()."""
  for p in sorted((p for p in sites if p[: len(path)] == path), key=len):
    for name, shape, _ in sites[p].leaves:
      node = params
      for key in p + (name,):
        node = node.get(key) if isinstance(node, Mapping) else None
      if node is None:
        continue
      full = tuple(np.shape(node))
      if len(full) < len(shape) or full[len(full) - len(shape) :] != shape:
        raise AdapterError(
          f'{sites[p].describe()}: its {name} is {full} in params but {shape} inside the module, and '
          'the two differ by more than leading stacked axes.'
        )
      return full[: len(full) - len(shape)]
  return ()


def _init_stacked(method: Method, key, site: Site, dtype, stack: tuple[int, ...]):
  """Init the leaves once per stacked layer, each from its own key."""
  if not stack:
    return method.init(key, site, dtype)
  n = int(np.prod(stack))
  leaves = jax.vmap(lambda k: method.init(k, site, dtype))(jax.random.split(key, n))
  return {k: v.reshape(stack + v.shape[1:]) for k, v in leaves.items()}


def add_adapter_leaves(params, placement: Mapping[Path, list[Method]], sites: Mapping[Path, Site], adapter_dtype, rng):
  """`params` with each placed adapter's leaves initialised next to the module's own leaves."""
  plan = []
  for i, path in enumerate(sorted(placement, key=paths_lib.dotted)):
    site = sites[path]
    module_params = dict(get_subtree(params, path))
    stack = stack_shape(path, sites, params)
    dtype = _adapter_dtype(adapter_dtype, site, params, path)
    for j, method in enumerate(placement[path]):
      clash = [n for n in method.leaf_names if n in module_params]
      if clash:
        raise AdapterError(f'{site.describe()} already has parameters named {clash}; cannot add {method.name}.')
      key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
      module_params.update(_init_stacked(method, key, site, dtype, stack))
    params = set_subtree(params, path, module_params)
    plan.append(SitePlan(site=site, methods=tuple(placement[path]), stack=stack))
  return params, tuple(plan)


def _trainable(config: TransferConfig, sites: Mapping[Path, Site], params, has_heads: bool) -> Trainable:
  heads = ((HEADS_KEY,),) if has_heads and HEADS_KEY in params else ()
  if config.trains_everything:
    return Trainable(everything=True, heads=heads)
  others = []
  for target in config.modules_to_save:
    others += select(sites, target, 'modules_to_save', topmost=True)
  norms = ()
  if config.unfreeze_norm and config.adapter_modes:
    norms = tuple(p for p, s in sites.items() if s.kind == 'norm' and s.leaves and p[:1] != (HEADS_KEY,))
  if not config.adapter_modes and not heads and not others:
    raise ValueError(
      "mode 'linear' trains the heads only, but the model has no heads (no `heads` field) and "
      '`modules_to_save` is empty, so nothing would train. Name the output layer in '
      '`modules_to_save`, or add an adapter mode.'
    )
  return Trainable(heads=heads, norms=norms, others=tuple(_topmost(others)))


# -- entry points ----------------------------------------------------------------------------


def prepare_for_transfer(
  model: nn.Module,
  params,
  config: TransferConfig,
  *example_args,
  rng: jax.Array | None = None,
  kinds: Mapping[str, str] | None = None,
  **example_kwargs,
) -> tuple[AdaptedModel, Any]:
  """Swap heads and add adapters: returns `(adapted_model, params)`.

  Args:
    model: the pretrained linen model.
    params: its params collection (`variables['params']`); reused leaf for leaf, never copied.
    config: a `TransferConfig`.
    *example_args: inputs to trace the model with, as for `model.init` (arrays or
      `jax.ShapeDtypeStruct`s; nothing is computed).
    rng: key for the new adapter leaves and new heads (default `jax.random.key(0)`).
    kinds: optional `{target: kind}` overrides for modules whose kind the class does not tell
      (`'dense'`, `'conv'`, `'norm'`, `'block'`, ...).
    **example_kwargs: keyword inputs for tracing.

  The returned params hold the pretrained trunk leaves (the same arrays), kept heads, freshly
  initialised new heads, and adapter leaves beside the kernels they adapt. The returned model's
  `apply({'params': params}, *args)` runs the adapters factored; `trainable_mask(model, params)`
  says what trains.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(
      f'`model` must be a flax.linen Module, found {type(model).__name__}. For other frameworks use '
      'prepare_params + materialize.'
    )
  if not isinstance(config, TransferConfig):
    raise TypeError(f'`config` must be a TransferConfig, found {type(config).__name__}.')
  if not example_args and not example_kwargs:
    raise TypeError(
      '`prepare_for_transfer` needs example inputs to trace the model, e.g. '
      'prepare_for_transfer(model, params, config, x, rng=key) (a jax.ShapeDtypeStruct is enough).'
    )
  rng = jax.random.key(0) if rng is None else rng
  head_rng, adapter_rng = jax.random.split(rng)
  trace = trace_model(model, *example_args, kinds=kinds, **example_kwargs)
  check_params_fit(params, trace.params)

  has_heads = model_heads(model) is not None
  if config.has_head_surgery:
    model, kept, new = swap_heads(model, config)
    trace = trace_model(model, *example_args, kinds=kinds, **example_kwargs)
    fresh = _fresh_heads(model, new, head_rng, example_args, example_kwargs)
    old_heads = params.get(HEADS_KEY, {})
    params = {**params, HEADS_KEY: {**{h: old_heads[h] for h in kept if h in old_heads}, **fresh}}
    check_params_fit(params, trace.params, argument='params after head surgery')

  placement = place_adapters(trace.sites, _requests(config))
  params, plan = add_adapter_leaves(params, placement, trace.sites, config.adapter_dtype, adapter_rng)
  trainable = _trainable(config, trace.sites, params, has_heads)
  return AdaptedModel(base=model, plan=plan, trainable=trainable, config=config), params


def adapt(
  model: nn.Module,
  params,
  adapters: Mapping[Any, Method | Sequence[Method]],
  *example_args,
  rng: jax.Array | None = None,
  modules_to_save: Sequence[Any] = (),
  unfreeze_norm: bool = False,
  adapter_dtype=None,
  kinds: Mapping[str, str] | None = None,
  **example_kwargs,
) -> tuple[AdaptedModel, Any]:
  """Place explicit adapter methods on the modules that targets match: the layer below the config.

  Use it for what a `TransferConfig` cannot say, such as a different rank per layer (PEFT's
  `rank_pattern`), or a method's own options. `adapters` maps a target (substring, `'re:...'` or
  compiled regex) to a method or a list of methods. Returns `(adapted_model, params)` like
  `prepare_for_transfer`; head surgery is `prepare_for_transfer`'s job.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name='out')(nn.Dense(8, name='q_proj')(x) + nn.Dense(8, name='v_proj')(x))
    >>> x = jnp.ones((1, 4))
    >>> params = Net().init(jax.random.key(0), x)['params']
    >>> model, p = fa.adapt(Net(), params, {'q_proj': fa.LoRA(rank=4, alpha=8), 'v_proj': fa.LoRA(rank=2, alpha=8)},
    ...                     x, modules_to_save=['out'])
    >>> p['q_proj']['lora_a'].shape, p['v_proj']['lora_a'].shape
    ((4, 4), (4, 2))
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f'`model` must be a flax.linen Module, found {type(model).__name__}.')
  if not isinstance(adapters, Mapping):
    raise TypeError(
      f"`adapters` must map targets to methods, e.g. {{'q_proj': LoRA(rank=8)}}; found {type(adapters).__name__}."
    )
  requests = []
  for target, methods in adapters.items():
    methods = (methods,) if isinstance(methods, Method) else tuple(methods)
    for m in methods:
      if not isinstance(m, Method):
        raise TypeError(f'`adapters[{target!r}]` must be adapter methods (LoRA, IA3, ...), found {m!r}.')
      requests.append((m, (target,), f'adapters[{paths_lib.describe_target(target)!r}]'))
  trace = trace_model(model, *example_args, kinds=kinds, **example_kwargs)
  check_params_fit(params, trace.params)
  placement = place_adapters(trace.sites, requests)
  params, plan = add_adapter_leaves(
    params, placement, trace.sites, adapter_dtype, jax.random.key(0) if rng is None else rng
  )
  others = []
  for target in modules_to_save:
    others += select(trace.sites, target, 'modules_to_save', topmost=True)
  norms = tuple(p for p, s in trace.sites.items() if s.kind == 'norm' and s.leaves) if unfreeze_norm else ()
  heads = ((HEADS_KEY,),) if model_heads(model) is not None and HEADS_KEY in params else ()
  trainable = Trainable(heads=heads, norms=norms, others=tuple(_topmost(others)))
  return AdaptedModel(base=model, plan=plan, trainable=trainable, config=None), params


def sites_from_params(params, kinds: Mapping[str, Any] | None = None) -> dict[Path, Site]:
  """Describe the layers of a bare params tree (no linen model to trace).

  A dict holding a `kernel` is a layer: 2-D kernels are Dense; other ranks need a hint in
  `kinds` (`'conv'`, or `('dense_general', n_input_axes)`). A dict with a `scale` and no kernel
  is a norm.
  """
  from flax_adapters.tracing import make_site  # pylint: disable=g-import-not-at-top

  kinds = dict(kinds or {})
  sites = {}
  flat = traverse_util.flatten_dict(params)
  modules = {k[:-1] for k in flat}
  for path in sorted(modules):
    node = get_subtree(params, path)
    leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
    hint = None
    for target, kind in kinds.items():
      if paths_lib.matches(target, path):
        hint = kind
    kernel = leaves.get('kernel')
    if kernel is None:
      if hint is not None or 'scale' in leaves:
        sites[path] = Site(
          path=path,
          kind=hint or 'norm',
          module_type='params',
          leaves=tuple((n, tuple(v.shape), str(v.dtype)) for n, v in sorted(leaves.items())),
        )
      continue
    if hint is None:
      if np.ndim(kernel) != 2:
        raise ValueError(
          f'the kernel at {paths_lib.dotted(path)!r} is {np.ndim(kernel)}-D; say what it is with '
          f"kinds={{'{paths_lib.dotted(path)}': 'conv'}} or ('dense_general', n_input_axes)."
        )
      hint = 'dense'
    n_in = None
    if isinstance(hint, tuple):
      hint, n_in = hint
    module = ParamsDict(path, leaves, hint, n_in)
    x_ndim = (n_in or 1) + 1 if hint != 'conv' else np.ndim(kernel)
    y = jax.ShapeDtypeStruct((1,) * (x_ndim - (n_in or 1)) + tuple(np.shape(kernel)[(n_in or 1) :]), kernel.dtype)
    sites[path] = make_site(module, hint, x_ndim, y, {})
  return sites


class ParamsDict:
  """Just enough of a linen module for `make_site` to describe a bare params dict."""

  def __init__(self, path, leaves, kind, n_in):
    self.scope = _Scope(path)
    self._leaves = leaves
    self.axis = tuple(range(-(n_in or 1), 0))
    self.batch_dims = ()
    self.kernel_size = tuple(np.shape(leaves['kernel'])[:-2]) if kind == 'conv' else None
    self.strides = 1
    self.padding = 'SAME'
    self.input_dilation = 1
    self.kernel_dilation = 1
    self.feature_group_count = 1
    self.precision = None

  @property
  def variables(self):
    return {'params': self._leaves}


class _Scope:
  def __init__(self, path):
    self.path = path


def prepare_params(params, config: TransferConfig, *, rng=None, kinds=None) -> tuple[AdaptedModel, Any]:
  """Add weight-space adapters (LoRA, IA3, Locon) to a bare params tree, for non-linen models.

  Use with `materialize`: `loss(materialize(params, model), batch)` runs any framework's forward
  (NNX via `nnx.split`/`nnx.merge`, Equinox, Haiku, plain functions) on the folded weights, and
  gradients flow to the adapter leaves. Houlsby needs a module's output and is linen-only.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax_adapters as fa
    >>> params = {'q_proj': {'kernel': jnp.ones((4, 4))}, 'out': {'kernel': jnp.ones((4, 2))}}
    >>> cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_targets=['q_proj'])
    >>> model, p = fa.prepare_params(params, cfg, rng=jax.random.key(0))
    >>> sorted(p['q_proj']), fa.materialize(p, model)['q_proj']['kernel'].shape
    (['kernel', 'lora_a', 'lora_b'], (4, 4))
  """
  if not isinstance(config, TransferConfig):
    raise TypeError(f'`config` must be a TransferConfig, found {type(config).__name__}.')
  if 'houlsby' in config.adapter_modes:
    raise ValueError(
      "`mode` 'houlsby' needs a linen model (it wraps a module's output); prepare_params only "
      'adds weight-space adapters. Use prepare_for_transfer with a linen model.'
    )
  if config.has_head_surgery:
    raise ValueError('head surgery needs a linen model with a `heads` field; use prepare_for_transfer.')
  sites = sites_from_params(params, kinds)
  rng = jax.random.key(0) if rng is None else rng
  placement = place_adapters(sites, _requests(config))
  params, plan = add_adapter_leaves(params, placement, sites, config.adapter_dtype, rng)
  trainable = _trainable(config, sites, params, has_heads=False)
  return AdaptedModel(base=None, plan=plan, trainable=trainable, config=config), params
