"""LLaMA in linen, parameter-for-parameter the Hugging Face `LlamaForCausalLM`.

Module paths mirror the PyTorch ones: flax `model/layers_0/self_attn/q_proj` is torch
`model.layers.0.self_attn.q_proj`. Grouped-query attention (`num_key_value_heads <
num_attention_heads`) shares each key/value head among a group of query heads without copying.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.models import hf_config
from flax_adapters.models.layers import Dtype, RMSNorm, activation, check_ids, dot_product_attention, padding_mask

ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA model; field names and defaults are those of HF `LlamaConfig`.

  RoPE is described by `rope_theta`, `rope_type` and, for the scaled types, `rope_factor` plus the
  `llama3` band parameters. HF spells these `rope_parameters` (transformers 5) or `rope_theta` +
  `rope_scaling` (transformers 4); `from_hf` reads both.

  Examples:
    >>> cfg = LlamaConfig.from_hf({'model_type': 'llama', 'hidden_size': 64, 'intermediate_size': 128,
    ...     'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2})
    >>> cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta
    (16, 2, 10000.0)
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: as many as attention heads
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  hidden_act: str = 'silu'
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_factor: float | None = None
  rope_low_freq_factor: float | None = None
  rope_high_freq_factor: float | None = None
  rope_original_max_position_embeddings: int | None = None
  attention_bias: bool = False
  attention_dropout: float = 0.0
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    # Sizes first, against sane bounds: nothing is built from a config before this.
    hf_config.check_at_most(self, 'layers', 'num_hidden_layers')
    hf_config.check_at_most(self, 'width', 'hidden_size', 'intermediate_size')
    hf_config.check_at_most(self, 'heads', 'num_attention_heads')
    hf_config.check_at_most(self, 'vocab', 'vocab_size')
    hf_config.check_at_most(self, 'positions', 'max_position_embeddings')
    # Resolve the "same as" defaults so every consumer sees concrete numbers.
    if self.num_key_value_heads is None:
      object.__setattr__(self, 'num_key_value_heads', self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    hf_config.check_at_most(self, 'heads', 'num_key_value_heads')
    hf_config.check_at_most(self, 'width', 'head_dim')
    hf_config.check_divides(self, 'num_attention_heads', 'num_key_value_heads')
    hf_config.check_probability(self, 'attention_dropout')
    hf_config.check_finite_positive(self, 'rms_norm_eps', 'rope_theta')
    hf_config.check_bool(self, 'attention_bias', 'mlp_bias', 'tie_word_embeddings')
    hf_config.check_token_ids(self)
    hf_config.check_str(self, 'hidden_act', 'rope_type')
    if self.head_dim % 2:
      raise ValueError(f'LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.')
    activation(self.hidden_act)
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(
        f'rope_type={self.rope_type!r} is not implemented; supported: {ROPE_TYPES}. '
        'Its inverse frequencies would have to be added to flax_adapters.models.llama.inverse_frequencies.'
      )
    needed = {
      'default': (),
      'linear': ('rope_factor',),
      'llama3': ('rope_factor', 'rope_low_freq_factor', 'rope_high_freq_factor'),
    }[self.rope_type]
    for name in needed:
      if getattr(self, name) is None:
        raise ValueError(
          f'rope_type={self.rope_type!r} needs LlamaConfig.{name}, which is None: config.json must give '
          f'{_HF_ROPE_NAMES[name]!r} in its rope_parameters (or rope_scaling). Fix: add it (the model card gives '
          'the value it was trained with).'
        )
    hf_config.check_finite_positive(self, *needed)
    if self.rope_type == 'llama3':
      if self.rope_original_max_position_embeddings is None:
        # transformers' default for a llama3 config without it.
        object.__setattr__(self, 'rope_original_max_position_embeddings', self.max_position_embeddings)
      hf_config.check_at_most(self, 'positions', 'rope_original_max_position_embeddings')
      if not self.rope_high_freq_factor > self.rope_low_freq_factor:
        raise ValueError(
          f'LlamaConfig.rope_high_freq_factor={self.rope_high_freq_factor} must be greater than '
          f'rope_low_freq_factor={self.rope_low_freq_factor} (llama3 RoPE blends between the two).'
        )

  @classmethod
  def from_hf(cls, config: Any, **overrides: Any) -> LlamaConfig:
    """From an HF LLaMA `config.json` dict (or `PretrainedConfig`); `overrides` replace fields.

    RoPE is resolved as transformers 5 resolves it (`RotaryEmbeddingConfigMixin`): a non-empty
    `rope_scaling` (the 4.x spelling) wins over `rope_parameters`; the base is the chosen dict's
    `rope_theta`, else the top-level `rope_theta`, else 10000; the type is its `rope_type`, else the
    legacy `type`; llama3's `original_max_position_embeddings` is the top-level one if config.json has
    it, else the dictionary's, else `max_position_embeddings`.
    """
    hf = hf_config.as_dict(config, argument='config')
    fields = hf_config.known_fields(cls, hf, 'llama')
    for key in ('rope_type', 'rope_factor', 'rope_theta'):
      fields.pop(key, None)  # only ever read through the rope dictionaries below
    return cls(**{**fields, **_rope_fields(hf), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (`LlamaForCausalLM`).

    RoPE is written in both spellings, which agree: transformers 5 reads `rope_parameters`,
    transformers 4 the top-level `rope_theta` and `rope_scaling` (null for the default type).
    """
    d = hf_config.hf_dict(self)
    theta = d.pop('rope_theta')
    scaling = {'rope_type': d.pop('rope_type')}
    for ours, theirs in _HF_ROPE_NAMES.items():
      value = d.pop(ours)
      if value is not None:
        scaling[theirs] = value
    return {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      **d,
      'rope_theta': theta,
      'rope_scaling': None if scaling['rope_type'] == 'default' else scaling,
      'rope_parameters': {**scaling, 'rope_theta': theta},
    }


# Our RoPE fields -> their keys in HF's rope_parameters / rope_scaling dictionaries.
_HF_ROPE_NAMES = {
  'rope_factor': 'factor',
  'rope_low_freq_factor': 'low_freq_factor',
  'rope_high_freq_factor': 'high_freq_factor',
  'rope_original_max_position_embeddings': 'original_max_position_embeddings',
}


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """The RoPE fields of an HF config dict, whichever transformers spelling it uses (see `from_hf`)."""
  for name in ('rope_scaling', 'rope_parameters'):
    if hf.get(name) is not None and not isinstance(hf[name], dict):
      raise TypeError(f'config {name}={hf[name]!r} must be an object of RoPE parameters or null.')
  rope = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  nested = sorted(k for k, v in rope.items() if isinstance(v, dict))
  if nested:
    raise ValueError(
      f'config RoPE parameters per layer type ({nested}) are not supported: LLaMA rotates every layer alike.'
    )
  theta = rope.get('rope_theta')
  if theta is None:
    theta = hf.get('rope_theta')
  fields = {
    'rope_theta': 10000.0 if theta is None else theta,
    'rope_type': rope.get('rope_type', rope.get('type', 'default')),
  }
  for ours, theirs in _HF_ROPE_NAMES.items():
    if rope.get(theirs) is not None:
      fields[ours] = rope[theirs]
  if fields['rope_type'] == 'llama3' and hf.get('original_max_position_embeddings') is not None:
    # transformers 5 (`standardize_rope_params`) lets a top-level value win over the dictionary's.
    fields['rope_original_max_position_embeddings'] = hf['original_max_position_embeddings']
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor'))
  if partial is not None and partial != 1.0:
    raise ValueError(f'config partial_rotary_factor={partial!r} is not supported (LLaMA rotates all of head_dim).')
  return fields


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies `[head_dim // 2]` (float32), as HF's `ROPE_INIT_FUNCTIONS` compute them.

  Examples:
    >>> inverse_frequencies(LlamaConfig(hidden_size=8, num_attention_heads=2)).tolist()
    [1.0, 0.009999999776482582]
  """
  dim = config.head_dim
  # HF: `1 / base ** (arange(0, dim, 2).float() / dim)`, all float32. numpy's float32 power differs from
  # torch's in about one entry in ten at head_dim 128 (a 2e-4 error in cos/sin at position 4096); the power
  # taken in float64 and rounded once equals torch's on the Llama 2/3 configs (rarely, elsewhere, one ulp off).
  exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  power = (np.float64(np.float32(config.rope_theta)) ** exponent.astype(np.float64)).astype(np.float32)
  inv_freq = (np.float32(1.0) / power).astype(np.float32)
  if config.rope_type == 'linear':
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == 'llama3':
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rotary_cos_sin(config: LlamaConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[batch, length, head_dim]` for `position_ids`, computed in float32 then cast (as HF)."""
  freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(config))
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF `apply_rotary_pos_emb` on `[batch, length, heads, head_dim]` (rotate-half convention)."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic: bool):
    cfg = self.config
    dense = lambda features, name: nn.Dense(
      features, use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    batch, length, _ = x.shape
    heads = lambda y, n: y.reshape(batch, length, n, cfg.head_dim)
    q = apply_rotary(
      heads(dense(cfg.num_attention_heads * cfg.head_dim, 'q_proj')(x), cfg.num_attention_heads), cos, sin
    )
    k = apply_rotary(
      heads(dense(cfg.num_key_value_heads * cfg.head_dim, 'k_proj')(x), cfg.num_key_value_heads), cos, sin
    )
    v = heads(dense(cfg.num_key_value_heads * cfg.head_dim, 'v_proj')(x), cfg.num_key_value_heads)
    use_dropout = not deterministic and cfg.attention_dropout > 0
    y = dot_product_attention(
      q,
      k,
      v,
      scale=cfg.head_dim**-0.5,
      mask=mask,
      is_causal=True,
      dropout_rate=cfg.attention_dropout,
      dropout_rng=self.make_rng('dropout') if use_dropout else None,
    )
    return dense(cfg.hidden_size, 'o_proj')(y.reshape(batch, length, -1))


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, name: nn.Dense(
      features, use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    gate = activation(cfg.hidden_act)(dense(cfg.intermediate_size, 'gate_proj')(x))
    return dense(cfg.hidden_size, 'down_proj')(gate * dense(cfg.intermediate_size, 'up_proj')(x))


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic: bool):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, name='input_layernorm', **kw)(x)
    x = x + LlamaAttention(cfg, name='self_attn', **kw)(h, cos, sin, mask, deterministic)
    h = RMSNorm(cfg.rms_norm_eps, name='post_attention_layernorm', **kw)(x)
    return x + LlamaMLP(cfg, name='mlp', **kw)(h)


class LlamaModel(nn.Module):
  """The LLaMA trunk (HF `LlamaModel`): `embed_tokens`, `layers_0 ...`, final `norm`.

  Returns the final hidden states `[batch, length, hidden_size]`.
  """

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), **kw)
    self.layers = [LlamaDecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, deterministic: bool = True):
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[-1])[None]
    check_ids(input_ids, self.config.vocab_size, argument='input_ids', field='vocab_size')
    x = self.embed_tokens(input_ids)
    # Shared by every layer, so computed once.
    cos, sin = rotary_cos_sin(self.config, jnp.broadcast_to(position_ids, input_ids.shape), x.dtype)
    mask = padding_mask(attention_mask)
    for layer in self.layers:
      x = layer(x, cos, sin, mask, deterministic)
    return self.norm(x)


class LlamaForCausalLM(nn.Module):
  """LLaMA with its language-model head (HF `LlamaForCausalLM`).

  With `config.tie_word_embeddings` the head is `model.embed_tokens.attend` and there is no
  `lm_head` parameter; otherwise `lm_head` is a bias-free Dense.

  Attributes:
    config: the architecture.
    dtype: computation dtype (e.g. `jnp.bfloat16`); logits come out in it.
    param_dtype: dtype of the parameters created by `init`.

  Examples:
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), ids)['params']
    >>> params['model']['layers_0']['self_attn']['k_proj']['kernel'].shape
    (16, 8)
    >>> model.apply({'params': params}, ids).shape
    (1, 3, 32)
  """

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.model = LlamaModel(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(
        self.config.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
      )

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, deterministic: bool = True):
    """Logits `[batch, length, vocab_size]` for `input_ids` `[batch, length]`.

    Args:
      input_ids: int token ids.
      attention_mask: optional `[batch, length]`, 1 for real tokens, 0 for padding.
      position_ids: optional `[batch, length]`; defaults to `0 .. length-1`.
      deterministic: False applies attention dropout when `config.attention_dropout > 0`.
    """
    h = self.model(input_ids, attention_mask, position_ids, deterministic=deterministic)
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(h)
    return self.lm_head(h)
