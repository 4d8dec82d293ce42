"""BERT in linen, parameter-for-parameter the Hugging Face `BertModel` (encoder, optional pooler).

Module paths mirror the PyTorch ones: flax `encoder/layer_0/attention/self/query` is torch
`encoder.layer.0.attention.self.query` (linen accepts a submodule named `self`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.models import hf_config
from flax_adapters.models.layers import Dtype, activation, check_ids, dot_product_attention, padding_mask


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder; field names and defaults are those of HF `BertConfig`.

  `add_pooling_layer` is not in HF's config (it is a `BertModel` constructor argument there); it
  says whether the model has the `pooler` (dense + tanh on the first token).

  Examples:
    >>> cfg = BertConfig.from_hf({'model_type': 'bert', 'hidden_size': 64, 'num_hidden_layers': 2,
    ...                           'num_attention_heads': 4, 'intermediate_size': 128})
    >>> cfg.head_dim, cfg.layer_norm_eps
    (16, 1e-12)
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  add_pooling_layer: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    # Sizes first, against sane bounds: nothing is built from a config before this.
    hf_config.check_at_most(self, 'layers', 'num_hidden_layers')
    hf_config.check_at_most(self, 'width', 'hidden_size', 'intermediate_size')
    hf_config.check_at_most(self, 'heads', 'num_attention_heads')
    hf_config.check_at_most(self, 'vocab', 'vocab_size', 'type_vocab_size')
    hf_config.check_at_most(self, 'positions', 'max_position_embeddings')
    hf_config.check_divides(self, 'hidden_size', 'num_attention_heads')
    hf_config.check_probability(self, 'hidden_dropout_prob', 'attention_probs_dropout_prob')
    hf_config.check_finite_positive(self, 'layer_norm_eps')
    hf_config.check_bool(self, 'add_pooling_layer')
    hf_config.check_token_ids(self)
    hf_config.check_str(self, 'hidden_act')
    activation(self.hidden_act)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, config: Any, **overrides: Any) -> BertConfig:
    """From an HF BERT `config.json` dict (or `PretrainedConfig`); `overrides` replace fields."""
    hf = hf_config.as_dict(config, argument='config')
    hf_config.refuse(
      hf, 'position_embedding_type', (None, 'absolute'), 'only absolute learned positions are implemented'
    )
    hf_config.refuse_pruned_heads(hf)
    hf_config.refuse(hf, 'is_decoder', (False,), 'this is the bidirectional BertModel encoder')
    hf_config.refuse(hf, 'add_cross_attention', (False,), 'cross-attention is not implemented')
    return cls(**{**hf_config.known_fields(cls, hf, 'bert'), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (for `BertModel`).

    `add_pooling_layer` is a `BertModel` argument, not an HF config field; it is written only when
    False, so that a pooler-less model read back (by `from_hf`) stays pooler-less.
    """
    d = hf_config.hf_dict(self, drop=() if not self.add_pooling_layer else ('add_pooling_layer',))
    return {'model_type': 'bert', 'architectures': ['BertModel'], **d}


class BertOutput(NamedTuple):
  last_hidden_state: jax.Array  # [batch, length, hidden_size]
  pooler_output: jax.Array | None  # [batch, hidden_size], None without the pooler


def _layer_norm(cfg: BertConfig, dtype, param_dtype):
  return nn.LayerNorm(
    cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name='LayerNorm'
  )


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name=name, **kw)
    x = (
      embed(cfg.vocab_size, 'word_embeddings')(input_ids)
      + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
      + embed(cfg.max_position_embeddings, 'position_embeddings')(position_ids)
    )
    x = _layer_norm(cfg, **kw)(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    batch, length, _ = x.shape
    project = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
      x
    ).reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
    rate = cfg.attention_probs_dropout_prob
    use_dropout = not deterministic and rate > 0
    y = dot_product_attention(
      project('query'),
      project('key'),
      project('value'),
      scale=cfg.head_dim**-0.5,
      mask=mask,
      dropout_rate=rate,
      dropout_rng=self.make_rng('dropout') if use_dropout else None,
    )
    return y.reshape(batch, length, cfg.hidden_size)


class BertResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): HF's `BertSelfOutput` and `BertOutput`."""

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(cfg.hidden_size, name='dense', **kw)(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(cfg, **kw)(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = BertSelfAttention(self.config, name='self', **kw)(x, mask, deterministic)
    return BertResidualOutput(self.config, name='output', **kw)(y, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name='dense')(x)
    return activation(cfg.hidden_act)(x)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(self.config, name='attention', **kw)(x, mask, deterministic)
    h = BertIntermediate(self.config, name='intermediate', **kw)(x)
    return BertResidualOutput(self.config, name='output', **kw)(h, x, deterministic)


class BertEncoder(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, self.param_dtype, name=f'layer_{i}')(x, mask, deterministic)
    return x


class BertPooler(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    dense = nn.Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name='dense')
    return jnp.tanh(dense(hidden[:, 0]))


class BertModel(nn.Module):
  """The BERT encoder (HF `BertModel`): `embeddings`, `encoder/layer_0 ...`, optional `pooler`.

  Attributes:
    config: the architecture (`config.add_pooling_layer` decides whether there is a pooler).
    dtype: computation dtype (e.g. `jnp.bfloat16`).
    param_dtype: dtype of the parameters created by `init`.

  Examples:
    >>> cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                  intermediate_size=32, max_position_embeddings=8)
    >>> model = BertModel(cfg)
    >>> ids, mask = jnp.array([[2, 5, 7, 0]]), jnp.array([[1, 1, 1, 0]])
    >>> params = model.init(jax.random.key(0), ids, mask)['params']
    >>> sorted(params['encoder']['layer_0']['attention']['self'])
    ['key', 'query', 'value']
    >>> out = model.apply({'params': params}, ids, mask)
    >>> out.last_hidden_state.shape, out.pooler_output.shape
    ((1, 4, 16), (1, 16))
  """

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, deterministic: bool = True
  ) -> BertOutput:
    """Encode `input_ids` `[batch, length]`.

    Args:
      input_ids: int token ids.
      attention_mask: optional `[batch, length]`, 1 for real tokens, 0 for padding.
      token_type_ids: optional `[batch, length]` segment ids; zeros by default.
      position_ids: optional `[batch, length]`; defaults to `0 .. length-1`.
      deterministic: False applies dropout (needs the `'dropout'` rng).

    Returns:
      `BertOutput(last_hidden_state, pooler_output)`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      if input_ids.shape[-1] > self.config.max_position_embeddings:
        raise ValueError(
          f'input_ids has length {input_ids.shape[-1]}, but the model has max_position_embeddings='
          f'{self.config.max_position_embeddings}; positions beyond them would read NaN. Truncate the input.'
        )
      position_ids = jnp.arange(input_ids.shape[-1])[None]
    cfg = self.config
    check_ids(input_ids, cfg.vocab_size, argument='input_ids', field='vocab_size')
    check_ids(token_type_ids, cfg.type_vocab_size, argument='token_type_ids', field='type_vocab_size')
    check_ids(position_ids, cfg.max_position_embeddings, argument='position_ids', field='max_position_embeddings')
    x = BertEmbeddings(self.config, name='embeddings', **kw)(input_ids, token_type_ids, position_ids, deterministic)
    x = BertEncoder(self.config, name='encoder', **kw)(x, padding_mask(attention_mask), deterministic)
    pooled = BertPooler(self.config, name='pooler', **kw)(x) if self.config.add_pooling_layer else None
    return BertOutput(x, pooled)
