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
  cross_entropy,
  dot_product_attention,
  padding_mask,
  tied_head_cross_entropy,
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
  tie_word_embeddings: bool = True

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
    hf_config.check_bool(self, 'scale_attn_weights', 'scale_attn_by_inverse_layer_idx', 'tie_word_embeddings')
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
    hf_config.refuse(hf, 'add_cross_attention', (False,), 'encoder-decoder GPT-2 is not implemented')
    return cls(**{**hf_config.known_fields(cls, hf, 'gpt2'), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (for `GPT2LMHeadModel`)."""
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], **dataclasses.asdict(self)}


@jax.custom_vjp
def _linear(x, kernel):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, kernel):
  # symbolic_zeros: `.perturbed` says whether a gradient is wanted. A frozen kernel (LoRA) needs
  # no kernel gradient, so x is not kept for it.
  x_res = x.value if kernel.perturbed else None
  return _linear(x.value, kernel.value), (x_res, kernel.value)


def _linear_bwd(residuals, g):
  x, kernel = residuals
  dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  if x is None:
    return dx, None
  # The kernel gradient as one `x^T·g` GEMM over the flattened tokens. Autodiff of `x·W` instead
  # gives `transpose(dot(g, x))`, which XLA:CPU lowers to a transposed copy of `g` and a slower
  # non-library GEMM.
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dk = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


@jax.custom_vjp
def _tied_head(h, embedding):
  """`h · embeddingᵀ` (the tied LM head), with each gradient written as one library GEMM."""
  return jax.lax.dot_general(h, embedding, (((h.ndim - 1,), (1,)), ((), ())))


def _tied_head_fwd(h, embedding):
  return _tied_head(h, embedding), (h, embedding)


def _tied_head_bwd(residuals, g):
  h, embedding = residuals
  dh = jax.lax.dot_general(g, embedding, (((g.ndim - 1,), (0,)), ((), ())))
  h2, g2 = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
  de = jax.lax.dot_general(g2, h2, (((0,), (0,)), ((), ())))
  return dh.astype(h.dtype), de.astype(embedding.dtype)


_tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)


class Dense(nn.Dense):
  """`nn.Dense` (same parameters, same forward) with a kernel gradient laid out for XLA:CPU's GEMMs."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param('kernel', self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = _linear(inputs, kernel)
    return y + bias if bias is not None else y


def _attention_fwd_core(qkv, mask, scale):
  """Causal softmax attention on the fused `[B, T, 3, N, H]` projections; heads-major inside."""
  qkv_t = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [3, B, N, T, H]: one copy, then no transposes
  q, k, v = qkv_t[0], qkv_t[1], qkv_t[2]
  logits = jnp.einsum('bnth,bnsh->bnts', q, k, preferred_element_type=jnp.float32) * scale
  t = logits.shape[-1]
  allowed = jnp.tril(jnp.ones((t, t), bool))
  if mask is not None:
    allowed = allowed & mask  # [B, 1, 1|T, T]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnts,bnsh->bnth', probs.astype(v.dtype), v)
  return out, (qkv_t, probs, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _causal_attention(qkv, mask, scale):
  """`[B, T, 3, N, H]` fused q/k/v -> `[B, N, T, H]` attention output (softmax in float32)."""
  return _attention_fwd_core(qkv, mask, scale)[0]


def _causal_attention_fwd(qkv, mask, scale):
  out, residuals = _attention_fwd_core(qkv, mask, scale)
  return out, residuals


def _causal_attention_bwd(scale, residuals, d_out):
  qkv_t, probs, out = residuals
  q, k, v = qkv_t[0], qkv_t[1], qkv_t[2]
  d_probs = jnp.einsum('bnth,bnsh->bnts', d_out, v, preferred_element_type=jnp.float32)
  # softmax backward with rowsum(dP∘P) = rowsum(dO∘O), a reduction over H instead of T.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (probs * (d_probs - delta) * scale).astype(q.dtype)
  dq = jnp.einsum('bnts,bnsh->bnth', d_logits, k)
  dk = jnp.einsum('bnts,bnth->bnsh', d_logits, q)
  dv = jnp.einsum('bnts,bnth->bnsh', probs.astype(d_out.dtype), d_out)
  d_qkv = jnp.transpose(jnp.stack([dq, dk, dv]), (1, 3, 0, 2, 4))  # back to [B, T, 3, N, H]
  return d_qkv.astype(qkv_t.dtype), None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


class GPT2Attention(nn.Module):
  config: GPT2Config
  layer_idx: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    dense = lambda features, name: Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    batch, length, _ = x.shape
    qkv = dense(3 * cfg.n_embd, 'c_attn')(x)
    qkv = qkv.reshape(batch, length, 3, cfg.n_head, cfg.head_dim)
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= float(self.layer_idx + 1)
    if not deterministic and cfg.attn_pdrop > 0:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      y = dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        mask=mask,
        is_causal=True,
        dropout_rate=cfg.attn_pdrop,
        dropout_rng=self.make_rng('dropout'),
      )
    else:
      y = jnp.transpose(_causal_attention(qkv, mask, float(scale)), (0, 2, 1, 3))
    y = dense(cfg.n_embd, 'c_proj')(y.reshape(batch, length, cfg.n_embd))
    return nn.Dropout(cfg.resid_pdrop)(y, deterministic=deterministic)


class GPT2MLP(nn.Module):
  config: GPT2Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.config
    x = Dense(cfg.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name='c_fc')(x)
    x = activation(cfg.activation_function)(x)
    x = Dense(cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype, name='c_proj')(x)
    return nn.Dropout(cfg.resid_pdrop)(x, deterministic=deterministic)


@jax.custom_vjp
def _materialize_grad(x):
  """The identity; its gradient is computed once and stored (see `_materialize_grad_bwd`)."""
  return x


def _materialize_grad_fwd(x):
  return x, None


def _materialize_grad_bwd(_, g):
  # The residual stream's gradient is a chain of cheap adds through every block. XLA:CPU fuses that
  # chain into each consumer, so block k's fusions recompute the adds of all blocks above it
  # (quadratic in depth; 40% of a LayerNorm-backward's time at 12 layers). A conditional is a
  # fusion boundary, so routing the gradient through one makes XLA store it once per block. The
  # predicate depends on the data (never true for a finite gradient) so it is not folded away;
  # both branches return g. (`optimization_barrier` does not survive XLA:CPU's pipeline.)
  return (jax.lax.cond(jnp.isnan(g.reshape(-1)[0]), lambda v: v * 1.0, lambda v: v, g),)


_materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


class GPT2Block(nn.Module):
  config: GPT2Config
  layer_idx: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_epsilon, use_fast_variance=False, name=name, **kw)
    x = _materialize_grad(x)
    x = x + GPT2Attention(cfg, self.layer_idx, name='attn', **kw)(norm('ln_1')(x), mask, deterministic)
    x = _materialize_grad(x)
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
      position_ids = jnp.arange(input_ids.shape[-1])[None]
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
    return self._head(h)

  def _head(self, h):
    if self.config.tie_word_embeddings:
      # `wte.attend(h)`, with the gradients laid out for the CPU GEMM library (`_tied_head`).
      h, embedding = nn.dtypes.promote_dtype(h, self.transformer.wte.embedding, dtype=self.dtype)
      return _tied_head(h, embedding)
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
