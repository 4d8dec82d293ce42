"""GPT-2 in linen, parameter-for-parameter the Hugging Face `GPT2LMHeadModel`.

Module paths mirror the PyTorch ones: flax `transformer/h_0/attn/c_attn` is torch
`transformer.h.0.attn.c_attn`. HF's `Conv1D` stores its weight as `[in, out]`, which is already
the layout of an `nn.Dense` kernel, and `c_attn` stays one fused Dense of `3 * n_embd` features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.models import hf_config
from flax_adapters.models.layers import (
  Dtype,
  activation,
  at_least_f32,
  check_ids,
  cross_entropy,
  dot_product_attention,
  padding_mask,
  tied_head_cross_entropy,
  token_dot_general,
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture of a GPT-2 model; field names and defaults are those of HF `GPT2Config`.

  Examples:
    >>> GPT2Config.from_hf({'model_type': 'gpt2', 'n_embd': 64, 'n_layer': 2, 'n_head': 4}).head_dim
    16
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = 'gelu_new'
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  # Scores and softmax in float32 whatever the compute dtype: what our attention always does.
  reorder_and_upcast_attn: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    # Sizes first, against sane bounds: nothing is built from a config before this.
    hf_config.check_at_most(self, 'layers', 'n_layer')
    hf_config.check_at_most(self, 'width', 'n_embd')
    hf_config.check_at_most(self, 'heads', 'n_head')
    hf_config.check_at_most(self, 'vocab', 'vocab_size')
    hf_config.check_at_most(self, 'positions', 'n_positions')
    if self.n_inner is not None:
      hf_config.check_at_most(self, 'width', 'n_inner')
    hf_config.check_divides(self, 'n_embd', 'n_head')
    hf_config.check_probability(self, 'resid_pdrop', 'embd_pdrop', 'attn_pdrop')
    hf_config.check_finite_positive(self, 'layer_norm_epsilon')
    hf_config.check_bool(
      self, 'scale_attn_weights', 'scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn', 'tie_word_embeddings'
    )
    hf_config.check_token_ids(self)
    hf_config.check_str(self, 'activation_function')
    activation(self.activation_function, field='activation_function')

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd

  @classmethod
  def from_hf(cls, config: Any, **overrides: Any) -> GPT2Config:
    """From an HF GPT-2 `config.json` dict (or `PretrainedConfig`); `overrides` replace fields."""
    hf = hf_config.as_dict(config, argument='config')
    hf_config.refuse_pruned_heads(hf)
    hf_config.refuse(hf, 'add_cross_attention', (False,), 'encoder-decoder GPT-2 is not implemented')
    return cls(**{**hf_config.known_fields(cls, hf, 'gpt2'), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (for `GPT2LMHeadModel`)."""
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], **hf_config.hf_dict(self)}


def _dense(features: int, name: str, dtype, param_dtype) -> nn.Dense:
  # A plain nn.Dense (HF Conv1D's [in, out] weight is its kernel), with the tokens flattened into
  # one GEMM axis (`layers.token_dot_general`: the kernel gradient is then one xᵀ·g GEMM on CPU).
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, dot_general=token_dot_general, name=name)


def causal_attention(qkv: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
  """Causal softmax attention on GPT-2's fused `[B, T, 3, N, H]` projections -> `[B, T, N, H]`.

  Heads-major inside: one transpose of the fused q/k/v, batched GEMMs with no further copies,
  softmax in float32 (float64 for float64 inputs), derivatives from `_attention`'s custom_jvp rule.
  (On GPU, `GPT2Attention` calls `jax.nn.dot_product_attention` instead.)

  Examples:
    >>> causal_attention(jnp.ones((1, 3, 3, 2, 4)), None, 0.5).shape
    (1, 3, 2, 4)
  """
  # [3, B, N, T, H]; split (not indexed), so that the gradient is one concatenation, not three pads.
  q, k, v = (a[0] for a in jnp.split(jnp.transpose(qkv, (2, 0, 3, 1, 4)), 3))
  t = qkv.shape[1]
  allowed = jnp.tril(jnp.ones((t, t), bool))
  if mask is not None:
    allowed = allowed & mask  # [B, 1, 1|T, T]
  return jnp.transpose(_attention(q, k, v, allowed, scale), (0, 2, 1, 3))


def _attention_probs(q, k, allowed, scale):
  dtype = at_least_f32(q.dtype)
  logits = jnp.einsum('bnth,bnsh->bnts', q, k, preferred_element_type=dtype) * scale
  return jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(dtype).min), axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _attention(q, k, v, allowed, scale):
  """`softmax(q·kᵀ·scale, where allowed)·v` on heads-major `[B, N, T, H]` arrays."""
  return jnp.einsum('bnts,bnsh->bnth', _attention_probs(q, k, allowed, scale).astype(v.dtype), v)


@_attention.defjvp
def _attention_jvp(scale, primals, tangents):
  # The softmax's tangent is P∘(dS - rowsum(P∘dS)); through the values its rowsum term is
  # rowsum(P∘dS)·(P·v) = rowsum(P∘dS)·out. Written with `out`, the tangent's transpose (reverse
  # mode) takes that rowsum as rowsum(d_out∘out), over the head dimension, instead of over the keys,
  # and keeps only q, k, v, P and out for the backward pass. Plain JAX in the primals, so forward
  # mode and higher derivatives work.
  q, k, v, allowed = primals
  tq, tk, tv, _ = tangents
  probs = _attention_probs(q, k, allowed, scale)
  out = jnp.einsum('bnts,bnsh->bnth', probs.astype(v.dtype), v)
  dtype = probs.dtype
  t_logits = jnp.einsum('bnth,bnsh->bnts', tq, k, preferred_element_type=dtype)
  t_logits += jnp.einsum('bnth,bnsh->bnts', q, tk, preferred_element_type=dtype)
  pt = probs * jnp.where(allowed, t_logits * scale, 0)
  t_out = jnp.einsum('bnts,bnsh->bnth', pt.astype(v.dtype), v)
  t_out -= jnp.sum(pt, axis=-1, keepdims=True).astype(v.dtype) * out
  t_out += jnp.einsum('bnts,bnsh->bnth', probs.astype(tv.dtype), tv)
  return out, t_out


class GPT2Attention(nn.Module):
  config: GPT2Config
  layer_idx: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    batch, length, _ = x.shape
    qkv = _dense(3 * cfg.n_embd, 'c_attn', self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(batch, length, 3, cfg.n_head, cfg.head_dim)
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= float(self.layer_idx + 1)
    dropout = not deterministic and cfg.attn_pdrop > 0
    if dropout or jax.default_backend() != 'cpu':
      # jax.nn.dot_product_attention off CPU (the GPU's fusions), or attention with dropout written out.
      y = dot_product_attention(
        qkv[:, :, 0],
        qkv[:, :, 1],
        qkv[:, :, 2],
        scale=scale,
        mask=mask,
        is_causal=True,
        dropout_rate=cfg.attn_pdrop,
        dropout_rng=self.make_rng('dropout') if dropout else None,
      )
    else:
      y = causal_attention(qkv, mask, float(scale))
    y = _dense(cfg.n_embd, 'c_proj', self.dtype, self.param_dtype)(y.reshape(batch, length, cfg.n_embd))
    return nn.Dropout(cfg.resid_pdrop)(y, deterministic=deterministic)


class GPT2MLP(nn.Module):
  config: GPT2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    x = _dense(cfg.inner_dim, 'c_fc', self.dtype, self.param_dtype)(x)
    x = activation(cfg.activation_function)(x)
    x = _dense(cfg.n_embd, 'c_proj', self.dtype, self.param_dtype)(x)
    return nn.Dropout(cfg.resid_pdrop)(x, deterministic=deterministic)


@jax.custom_jvp
def _store_residual_grad(x):
  """The identity; on XLA:CPU its tangent, so also the residual stream's gradient, is stored once
  per block (see `_store_residual_grad_jvp`)."""
  return x


@_store_residual_grad.defjvp
def _store_residual_grad_jvp(primals, tangents):
  # The residual stream's gradient is a chain of cheap adds through every block. XLA:CPU fuses that
  # chain into each consumer, so block k's fusions recompute the adds of all blocks above it
  # (quadratic in depth). A conditional is a fusion boundary: routing the tangent through one (both
  # branches the identity, the predicate a never-true test on the primal, so it is not folded away)
  # makes XLA store the gradient once per block, since the transpose of a linear cond is a cond.
  # A custom_jvp rule, so forward mode works too; `GPT2Block` uses it on CPU only.
  (x,), (t,) = primals, tangents
  never = jnp.isnan(x.reshape(-1)[0])
  return x, jax.lax.cond(never, lambda v: v * 1.0, lambda v: v, t)


def _residual(x):
  return _store_residual_grad(x) if jax.default_backend() == 'cpu' else x


class GPT2Block(nn.Module):
  config: GPT2Config
  layer_idx: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_epsilon, use_fast_variance=False, name=name, **kw)
    x = _residual(x)
    x = x + GPT2Attention(cfg, self.layer_idx, name='attn', **kw)(norm('ln_1')(x), mask, deterministic)
    x = _residual(x)
    return x + GPT2MLP(cfg, name='mlp', **kw)(norm('ln_2')(x), deterministic)


class GPT2Model(nn.Module):
  """The GPT-2 trunk (HF `GPT2Model`): embeddings, blocks `h_0 ... h_{n-1}`, final `ln_f`.

  Returns the final hidden states `[batch, length, n_embd]`.
  """

  config: GPT2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, **kw)
    self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw)
    self.drop = nn.Dropout(cfg.embd_pdrop)
    self.h = [GPT2Block(cfg, i, **kw) for i in range(cfg.n_layer)]
    self.ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, use_fast_variance=False, **kw)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, deterministic: bool = True):
    if position_ids is None:
      if input_ids.shape[-1] > self.config.n_positions:
        raise ValueError(
          f'input_ids has length {input_ids.shape[-1]}, but the model has n_positions={self.config.n_positions} '
          'position embeddings; positions beyond them would read NaN. Truncate the input.'
        )
      position_ids = jnp.arange(input_ids.shape[-1])[None]
    check_ids(input_ids, self.config.vocab_size, argument='input_ids', field='vocab_size')
    check_ids(position_ids, self.config.n_positions, argument='position_ids', field='n_positions')
    x = self.drop(self.wte(input_ids) + self.wpe(position_ids), deterministic=deterministic)
    mask = padding_mask(attention_mask)
    for block in self.h:
      x = block(x, mask, deterministic)
    return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with its language-model head (HF `GPT2LMHeadModel`).

  With `config.tie_word_embeddings` (GPT-2's default) the head is `transformer.wte.attend`, so there
  is no `lm_head` parameter; otherwise `lm_head` is a bias-free Dense.

  Attributes:
    config: the architecture.
    dtype: computation dtype (e.g. `jnp.bfloat16`); logits come out in it.
    param_dtype: dtype of the parameters created by `init`.

  Examples:
    >>> cfg = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    >>> model = GPT2LMHeadModel(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), ids)['params']
    >>> sorted(params['transformer']['h_0']['attn'])
    ['c_attn', 'c_proj']
    >>> model.apply({'params': params}, ids).shape
    (1, 3, 32)
  """

  config: GPT2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.transformer = GPT2Model(self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, *, deterministic: bool = True):
    """Logits `[batch, length, vocab_size]` for `input_ids` `[batch, length]`.

    Args:
      input_ids: int token ids.
      attention_mask: optional `[batch, length]`, 1 for real tokens, 0 for padding.
      position_ids: optional `[batch, length]`; defaults to `0 .. length-1`.
      deterministic: False applies dropout (needs the `'dropout'` rng).
    """
    h = self.transformer(input_ids, attention_mask, position_ids, deterministic=deterministic)
    if self.config.tie_word_embeddings:
      return self.transformer.wte.attend(h)
    return self.lm_head(h)

  def loss(self, input_ids, labels=None, attention_mask=None, position_ids=None, *, deterministic: bool = True):
    """Next-token cross-entropy: HF's `GPT2LMHeadModel(input_ids, labels=labels).loss`.

    Position t predicts `labels[:, t + 1]`; the mean runs over the predicted labels that are not
    -100 (`labels` defaults to `input_ids`). Call it as
    `model.apply({'params': p}, input_ids, method='loss')`. Faster and leaner than taking the loss
    of `__call__`'s logits: the head projects only the positions that predict something (not the
    last), so the logits are never sliced or copied, and the cross-entropy's gradient is one fused
    pass (`layers.cross_entropy`).

    Examples:
      >>> cfg = GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
      >>> model, ids = GPT2LMHeadModel(cfg), jnp.array([[1, 2, 3]])
      >>> params = model.init(jax.random.key(0), ids)['params']
      >>> model.apply({'params': params}, ids, method='loss').shape
      ()
    """
    labels = input_ids if labels is None else labels
    h = self.transformer(input_ids, attention_mask, position_ids, deterministic=deterministic)[:, :-1]
    if self.config.tie_word_embeddings:
      h, embedding = nn.dtypes.promote_dtype(h, self.transformer.wte.embedding, dtype=self.dtype)
      return tied_head_cross_entropy(h, embedding, labels[:, 1:])
    return cross_entropy(self.lm_head(h), labels[:, 1:])
