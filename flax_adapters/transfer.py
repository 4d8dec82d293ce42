"""`prepare_for_transfer`: head surgery, then `adapt` with the rules a `TransferConfig` compiles to.

It traces the model once (abstractly) to learn each module's kind, checks the params fit it, swaps
heads (kept heads and the trunk keep their very arrays; new heads are initialised), and places the
config's adapters through the one placement pipeline (`placement.adapt_traced`).
`prepare_params` does the same for a bare params tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn

from flax_adapters import rules as rules_lib
from flax_adapters.config import TransferConfig
from flax_adapters.forward import AdaptedModel
from flax_adapters.heads import model_heads, transplant
from flax_adapters.methods import LEAF_NAMES
from flax_adapters.placement import adapt_traced
from flax_adapters.tracing import trace_model, trace_params
from flax_adapters.tree import check_params_fit


def _config_kwargs(config: TransferConfig) -> dict[str, Any]:
  return dict(
    modules_to_save=config.modules_to_save,
    unfreeze_norm=config.unfreeze_norm and bool(config.adapter_modes),
    adapter_dtype=config.adapter_dtype,
    train_everything=config.trains_everything,
    config=config,
  )


def _check_modules_to_save(config: TransferConfig, sites) -> None:
  """`mode='full'` trains every module, so `modules_to_save` places nothing; its targets must still match
  (a typo is an error in every mode, so one config serves a sweep over modes)."""
  if config.trains_everything:
    for target in config.modules_to_save:
      rules_lib.select(sites, target, 'modules_to_save')


def _refuse_nothing_to_train(model: AdaptedModel, base, config: TransferConfig) -> None:
  t = model.trainable
  if model.plan or t.everything or t.heads or t.norms or t.others:
    return
  if model_heads(base) is None:
    why = 'the model has no heads (no `heads` field)'
  else:
    why = 'no head is left after `remove_heads`/`keep_heads`' if config.has_head_surgery else 'the model has no heads'
  raise ValueError(
    f"mode 'linear' trains the heads only, but {why} and `modules_to_save` is empty, so nothing would train. "
    'Name the output layer in `modules_to_save`, add a head with `new_heads`, or add an adapter mode.'
  )


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
  check_params_fit(params, trace.params, adapter_leaves=LEAF_NAMES)
  base = model
  if config.has_head_surgery:
    model, params = transplant(
      model,
      params,
      head_rng,
      example_args,
      example_kwargs,
      remove=config.remove_heads,
      keep=config.keep_heads,
      new=config.new_heads,
    )
    trace = trace_model(model, *example_args, kinds=kinds, **example_kwargs)
    check_params_fit(params, trace.params, argument='params after head surgery')
  _check_modules_to_save(config, trace.sites)
  adapted, params = adapt_traced(model, trace, params, config.rules(), rng=adapter_rng, **_config_kwargs(config))
  _refuse_nothing_to_train(adapted, base, config)
  return adapted, params


def prepare_params(params, config: TransferConfig, *, rng=None, kinds=None) -> tuple[AdaptedModel, Any]:
  """Add weight-space adapters (LoRA, IA3, Locon, ...) to a bare params tree, for non-linen models.

  Use with `materialize`: `loss(materialize(params, model), batch)` runs any framework's forward
  (NNX via `nnx.split`/`nnx.merge`, Equinox, Haiku, plain functions) on the folded weights, and
  gradients flow to the adapter leaves. Methods that transform a module's output (Houlsby) need
  a linen model.

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
  if config.has_head_surgery:
    raise ValueError('head surgery needs a linen model with a `heads` field; use prepare_for_transfer.')
  trace = trace_params(params, kinds)
  _check_modules_to_save(config, trace.sites)
  adapted, params = adapt_traced(None, trace, params, config.rules(), rng=rng, **_config_kwargs(config))
  _refuse_nothing_to_train(adapted, None, config)
  return adapted, params
