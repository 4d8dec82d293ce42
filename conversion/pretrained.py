"""Whole model directories: `config.json` + weights, as `from_pretrained`/`save_pretrained` use."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from conversion.families import Family, get_family
from conversion.state_dict import load_state_dict, read_json_object, save_safetensors, write_json


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(model_dir), 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'model_dir={os.fspath(model_dir)!r} has no config.json.')
  hf = read_json_object(path, 'model config')
  if not isinstance(hf.get('model_type'), str):
    raise ValueError(
      f"{path!r} has model_type={hf.get('model_type')!r}; expected the name of a model family (e.g. 'llama'), "
      'so its model family is unknown.'
    )
  return hf


def read_config(model_dir: str | os.PathLike, **overrides: Any) -> tuple[Family, Any]:
  """`(family, config)` of a model directory; a bad value is reported with the file it is in."""
  hf = read_hf_config(model_dir)
  family = get_family(hf['model_type'])
  fields = {f.name for f in dataclasses.fields(family.config_class)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
      f'config override(s) {unknown} are not fields of {family.config_class.__name__} (the keyword arguments '
      f'of load_pretrained/read_config, not config.json); expected some of {sorted(fields)}.'
    )
  try:
    return family, family.config_from_hf(hf, **overrides)
  except (ValueError, TypeError) as e:
    raise type(e)(f'{os.path.join(os.fspath(model_dir), "config.json")!r}: {e}') from None


def load_pretrained(
  model_dir: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  ignore: tuple[str, ...] = (),
  **config_overrides: Any,
):
  """Load an HF model directory as `(flax_model, params, config)`.

  `config.json`'s `model_type` picks the family; the weights are `model.safetensors` (or a sharded
  index, or `pytorch_model.bin` read with `weights_only=True`).

  Args:
    model_dir: directory written by `save_pretrained` (HF's or ours).
    dtype: computation dtype of the returned model.
    param_dtype: dtype of the returned params.
    ignore: regexes of checkpoint keys to drop deliberately (see `Family.torch_to_flax`).
    **config_overrides: replace config fields (e.g. `add_pooling_layer=False` for a BERT
      checkpoint saved without its pooler).

  Returns:
    `(model, params, config)`; run with `model.apply({'params': params}, input_ids, ...)`.
  """
  family, config = read_config(model_dir, **config_overrides)
  params = family.torch_to_flax(load_state_dict(model_dir), config, param_dtype=param_dtype, ignore=ignore)
  return family.flax_model(config, dtype=dtype, param_dtype=param_dtype), params, config


def family_of(config: Any) -> Family:
  for name in ('bert', 'llama', 'gpt2'):
    family = get_family(name)
    if isinstance(config, family.config_class):
      return family
  raise TypeError(f'config must be a BertConfig, LlamaConfig or GPT2Config, got {type(config).__name__}.')


def _floating_dtype(params: Any) -> str | None:
  """The one floating dtype name of `params`' leaves (`'bfloat16'`, ...), None if they mix several or have none."""
  names = {jnp.dtype(leaf.dtype).name for leaf in jax.tree_util.tree_leaves(params) if hasattr(leaf, 'dtype')}
  floating = {n for n in names if jnp.issubdtype(jnp.dtype(n), jnp.floating)}
  return floating.pop() if len(floating) == 1 else None


def save_pretrained(
  model_dir: str | os.PathLike,
  params: Mapping[str, Any],
  config: Any,
  *,
  dtype: str | None = None,
) -> None:
  """Write `config.json` + `model.safetensors` that `transformers`' `from_pretrained` loads.

  Args:
    model_dir: output directory (created if needed).
    params: flax params of the family's model.
    config: its config; the family follows from its class.
    dtype: storage dtype name (`'float32'`, `'float16'`, `'bfloat16'`); None keeps the params' (bfloat16
      params are stored as bfloat16, not widened), and config.json's `dtype` says which it is.

  A BERT config with `add_pooling_layer=False` writes no pooler; `BertModel.from_pretrained` then
  initialises a random one (and says so), so pass `add_pooling_layer=False` there too.
  """
  family = family_of(config)
  state_dict = family.flax_to_torch(params, config)
  if dtype is None:
    # `flax_to_torch` widens bfloat16 to float32 (numpy has no bfloat16): narrow it again on write.
    dtype = _floating_dtype(params)
  os.makedirs(model_dir, exist_ok=True)
  hf = family.config_class.to_hf(config)
  if dtype is not None:
    hf['dtype'] = dtype
  # Weights first: a writer killed between the two leaves the old config, never a config without weights.
  save_safetensors(state_dict, os.path.join(model_dir, 'model.safetensors'), dtype=dtype)
  write_json(os.path.join(model_dir, 'config.json'), hf)
