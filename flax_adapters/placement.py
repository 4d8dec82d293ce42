"""`adapt`: the one placement pipeline — rules in, an adapted model and params out.

Tracing (or describing a bare params tree) gives one `Site` per module; `rules.place` decides which
methods go where, every placement checked; the methods' leaves are initialised next to the
kernels they adapt; and `trainable_parts` says, in this one place, what else trains. Both
`prepare_for_transfer` (head surgery, then `TransferConfig.rules()`) and `prepare_params` (bare
params trees) run through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flax_adapters import paths as paths_lib
from flax_adapters import rules as rules_lib
from flax_adapters.forward import AdaptedModel, SitePlan, Trainable
from flax_adapters.heads import HEADS_KEY, model_heads
from flax_adapters.methods import LEAF_NAMES, AdapterError, Method
from flax_adapters.tracing import Site, Trace, trace_model, trace_params
from flax_adapters.tree import check_params_fit, get_subtree, has_leaves, set_subtree

Path = tuple[str, ...]


def check_adapter_dtype(adapter_dtype, argument: str = 'adapter_dtype') -> None:
  if adapter_dtype is None:
    return
  try:
    dtype = jnp.dtype(adapter_dtype)
  except TypeError:
    raise TypeError(
      f"`{argument}` must be a floating dtype such as 'float32' or jnp.bfloat16, or None (the kernel's dtype "
      f'promoted to at least float32); found {adapter_dtype!r}.'
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'`{argument}` must be a floating dtype (adapter leaves train), found {dtype}.')


def _adapter_dtype(adapter_dtype, site: Site, params: Mapping, path: Path):
  if adapter_dtype is not None:
    return jnp.dtype(adapter_dtype)
  # The kernel as the tree holds it (a model declared float32 may be given float64 or bfloat16 params).
  node = get_subtree(params, path)
  kernel = (
    node.get(dict(site.option('leaf_names') or ()).get('kernel', 'kernel')) if isinstance(node, Mapping) else None
  )
  dtype = kernel.dtype if hasattr(kernel, 'dtype') else site.kernel_dtype
  if dtype is None:
    leaves = [v for v in jax.tree.leaves(get_subtree(params, path)) if jnp.issubdtype(v.dtype, jnp.floating)]
    dtype = leaves[0].dtype if leaves else jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def stack_shape(path: Path, sites: Mapping[Path, Site], params) -> tuple[int, ...]:
  """Leading axes a module's params are stacked on in `params` (nn.scan / nn.vmap), else ()."""
  for p in sorted((p for p in sites if p[: len(path)] == path), key=len):
    for name, shape, _ in sites[p].leaves:
      node = params
      for key in (*p, name):
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


def _checked_init(method: Method, key, site: Site, dtype):
  """`method.init`, refused with the method, hook and fix when it does not give the leaves `shapes` promises."""
  leaves = method.init(key, site, dtype)
  where = f'{type(method).__name__}.init (method {method.name!r}) on {site.describe()}'
  if not isinstance(leaves, Mapping) or set(leaves) != set(method.leaf_names):
    got = sorted(leaves) if isinstance(leaves, Mapping) else type(leaves).__name__
    raise AdapterError(
      f'{where} returned {got}, but the method declares leaf_names {method.leaf_names}; return a dict with '
      'exactly those keys.'
    )
  want = method.shapes(site)
  for leaf in method.leaf_names:
    value = leaves[leaf]
    shape, leaf_dtype = getattr(value, 'shape', None), getattr(value, 'dtype', None)
    if shape is None or tuple(shape) != tuple(want[leaf]):
      raise AdapterError(
        f'{where} returned {leaf!r} of shape {None if shape is None else tuple(shape)}, but {type(method).__name__}.'
        f'shapes says {tuple(want[leaf])}; make init create exactly the shapes that `shapes(site)` returns.'
      )
    if leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.inexact):
      raise AdapterError(
        f'{where} returned {leaf!r} of dtype {leaf_dtype}; adapter leaves train, so create them with the '
        f'`dtype` init is given ({jnp.dtype(dtype)}).'
      )
  return {leaf: jnp.asarray(leaves[leaf]) for leaf in method.leaf_names}


def _init_stacked(method: Method, key, site: Site, dtype, stack: tuple[int, ...]):
  """Init the leaves once per stacked layer, each from its own key."""
  if not stack:
    return _checked_init(method, key, site, dtype)
  n = int(np.prod(stack))
  leaves = jax.vmap(lambda k: _checked_init(method, k, site, dtype))(jax.random.split(key, n))
  return {k: v.reshape(stack + v.shape[1:]) for k, v in leaves.items()}


def add_adapter_leaves(
  params, placement: Mapping[Path, Sequence[Method]], sites: Mapping[Path, Site], adapter_dtype, rng
):
  """`params` with each placed adapter's leaves initialised next to the module's own leaves."""
  plan = []
  for i, path in enumerate(sorted(placement, key=paths_lib.dotted)):
    site = sites[path]
    try:
      module_params = dict(get_subtree(params, path))
    except (KeyError, TypeError):
      raise AdapterError(
        f'{site.describe()} owns no parameters in `params` (a parameter-free module, or one whose layers are '
        f'created by its parent), so there is no place for {[m.name for m in placement[path]]} leaves. Target '
        'a module that owns its layers (e.g. the parent block).'
      ) from None
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


def trainable_parts(
  sites: Mapping[Path, Site],
  params,
  *,
  everything: bool = False,
  heads: bool = False,
  modules_to_save: Sequence[Any] = (),
  unfreeze_norm: bool = False,
) -> Trainable:
  """What trains besides the adapter leaves — the one place this is decided.

  `heads`: the model follows the heads protocol, so its heads (`params['heads']`) train whole;
  `modules_to_save`: targets of modules that train whole; `unfreeze_norm`: norm scales and biases
  of the trunk train; `everything`: full fine-tuning.
  """
  head_paths = ((HEADS_KEY,),) if heads and has_leaves(params.get(HEADS_KEY)) else ()
  if everything:
    return Trainable(everything=True, heads=head_paths)
  others = []
  for target in modules_to_save:
    others += rules_lib.select(sites, target, 'modules_to_save', topmost=True)
  norms = ()
  if unfreeze_norm:
    norms = tuple(p for p, s in sites.items() if s.kind == 'norm' and s.leaves and p[:1] != (HEADS_KEY,))
  return Trainable(heads=head_paths, norms=norms, others=rules_lib.topmost(others))


def _describe_rng(method: Method) -> str:
  dropout = getattr(method, 'dropout', None)
  return f'{method.name}(dropout={dropout})' if dropout is not None else f'{method.name} (needs_rng)'


def adapt_traced(
  model,
  trace: Trace,
  params,
  rules: Sequence[rules_lib.Rule],
  *,
  rng=None,
  modules_to_save=(),
  unfreeze_norm=False,
  adapter_dtype=None,
  train_everything=False,
  config=None,
) -> tuple[AdaptedModel, Any]:
  """`adapt` on a model already traced (or a bare params tree described by `trace_params`)."""
  check_adapter_dtype(adapter_dtype)
  if model is None:
    check_params_fit(params, trace.params, adapter_leaves=LEAF_NAMES, bare_tree=True)
    needs_module = sorted({m.name for r in rules for m in r.methods if not m.weight_space})
    if needs_module:
      raise ValueError(
        f"{needs_module} need a linen model (they transform a module's output), but a bare params tree has no "
        'forward to wrap; adapt a linen model with prepare_for_transfer / adapt, or use weight-space methods.'
      )
    # Dropout acts on a layer's input, which folded weights (materialize) never see.
    dropped = sorted({_describe_rng(m) for r in rules for m in r.methods if m.needs_rng})
    if dropped:
      raise ValueError(
        f'{dropped}: adapter dropout needs the factored forward of a linen model, but a bare params tree is '
        'used through materialize (folded weights, no inputs to drop). Set the dropout to 0 (lora_dropout=0.0).'
      )
    unfoldable = sorted({type(m).__name__ for r in rules for m in r.methods if type(m).fold is Method.fold})
    if unfoldable:
      raise ValueError(
        f'{unfoldable} define no `fold`, and a bare params tree runs only through materialize (folded weights), '
        'so they could never act; define fold(site, leaves, module_params), or adapt a linen model instead.'
      )
  placement = rules_lib.place(trace.sites, rules)
  rng = jax.random.key(0) if rng is None else rng
  params, plan = add_adapter_leaves(params, placement, trace.sites, adapter_dtype, rng)
  trainable = trainable_parts(
    trace.sites,
    params,
    everything=train_everything,
    heads=model is not None and model_heads(model) is not None,
    modules_to_save=modules_to_save,
    unfreeze_norm=unfreeze_norm,
  )
  return AdaptedModel(base=model, plan=plan, trainable=trainable, config=config), params


def adapt(
  model: nn.Module | None,
  params,
  rules,
  *example_args,
  rng: jax.Array | None = None,
  modules_to_save: Sequence[Any] = (),
  unfreeze_norm: bool = False,
  adapter_dtype=None,
  kinds: Mapping[str, Any] | None = None,
  **example_kwargs,
) -> tuple[AdaptedModel, Any]:
  """Place adapter methods by rules: the one placement path (`prepare_for_transfer` compiles to it).

  Args:
    model: the linen model, or None for a bare params tree (NNX state, Equinox, Haiku, ... — then
      run it with `materialize`; only weight-space methods apply).
    params: its params collection; reused leaf for leaf, never copied.
    rules: an ordered sequence of `fa.Rule(target=..., methods=...)` or `(target, method or
      methods)` pairs, or a mapping `{target: method or methods}`. A target is a substring of a
      dotted module path, `'re:<regex>'` or a compiled regex. Every rule must match a module.
    *example_args: inputs to trace the model with, as for `model.init` (arrays or
      `jax.ShapeDtypeStruct`s; nothing is computed).
    rng: key for the new adapter leaves (default `jax.random.key(0)`).
    modules_to_save: targets of modules that train whole (e.g. a classifier).
    unfreeze_norm: norm scales and biases train too.
    adapter_dtype: dtype of the adapter leaves; None: the kernel's promoted to at least float32.
    kinds: `{target: kind}` for modules whose kind the class does not tell (`'dense'`, `'conv'`,
      `'norm'`, `'block'`; for bare params also `('dense_general', n_input_axes)`).
    **example_kwargs: keyword inputs for tracing.

  Returns:
    `(adapted_model, params)`: `adapted_model.apply({'params': params}, *args)` runs the adapters
    factored; `trainable_mask(adapted_model, params)` says what trains.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_adapters as fa
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name='out')(nn.Dense(8, name='q_proj')(x) + nn.Dense(8, name='v_proj')(x))
    >>> x = jnp.ones((1, 4))
    >>> params = Net().init(jax.random.key(0), x)['params']
    >>> rules = [fa.Rule(target='q_proj', methods=fa.LoRA(rank=4, alpha=8)),
    ...          fa.Rule(target='v_proj', methods=[fa.LoRA(rank=2, alpha=8), fa.IA3()])]
    >>> model, p = fa.adapt(Net(), params, rules, x, modules_to_save=['out'])
    >>> p['q_proj']['lora_a'].shape, sorted(p['v_proj'])
    ((4, 4), ['bias', 'ia3_scale', 'kernel', 'lora_a', 'lora_b'])
  """
  rules = rules_lib.as_rules(rules)
  if not rules and not modules_to_save and not unfreeze_norm:
    raise ValueError(
      '`rules` is empty and neither `modules_to_save` nor `unfreeze_norm` is set, so nothing would train. '
      "Give rules such as {'q_proj': fa.LoRA(rank=8)}, or name the modules that train whole in `modules_to_save`."
    )
  if model is None:
    if example_args or example_kwargs:
      raise TypeError('`adapt` of a bare params tree (model=None) takes no example inputs.')
    trace = trace_params(params, kinds)
  else:
    if not isinstance(model, nn.Module):
      raise TypeError(
        f'`model` must be a flax.linen Module, or None for a bare params tree; found {type(model).__name__}.'
      )
    if not example_args and not example_kwargs:
      raise TypeError(
        '`adapt` needs example inputs to trace the model, e.g. adapt(model, params, rules, x) '
        '(a jax.ShapeDtypeStruct is enough).'
      )
    trace = trace_model(model, *example_args, kinds=kinds, **example_kwargs)
    check_params_fit(params, trace.params, adapter_leaves=LEAF_NAMES)
  return adapt_traced(
    model,
    trace,
    params,
    rules,
    rng=rng,
    modules_to_save=modules_to_save,
    unfreeze_norm=unfreeze_norm,
    adapter_dtype=adapter_dtype,
  )
