"""The transformer tower: 9 blocks of multi-query attention and MLP, with a pair stack on even blocks.

Paths mirror the port: `tower.blocks.N.{mha,mlp,attn_bias}` and, on even N,
`tower.blocks.N.pair_update.{seq2pair,row_attn,pair_mlp}`. `mha` and `mlp` are sub-blocks whose
residual add lives in the block (`x = x + mha(x, bias)`), so Houlsby block adapters wrap them
exactly as in the port.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flax_adapters.genomics.alphagenome.config import AlphaGenomeConfig
from flax_adapters.genomics.alphagenome.layers import LayerNorm, RMSBatchNorm, apply_rope, avg_pool, gelu_exact, repeat

Array = jax.Array


def _f32(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class MHABlock(nn.Module):
  """Pre- and post-normed multi-query attention with a pair bias (no residual: the block adds it).

  Queries have `num_heads` heads of `qk_dim`; one key head (`qk_dim`) and one value head (`v_dim`)
  are shared by all of them. q, k and v are layer-normed per head, q and k rotary-encoded; logits
  `q·k / sqrt(qk_dim) + bias` are soft-capped with `cap * tanh(logits / cap)`.
  """

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, attention_bias: Array | None) -> Array:
    c = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(param_dtype=self.param_dtype)
    h = RMSBatchNorm(name='norm', **norm)(x)
    split = lambda t, heads: t.reshape(t.shape[:-1] + (heads, t.shape[-1] // heads))
    q = LayerNorm(name='norm_q', **norm)(split(nn.Dense(c.num_heads * c.qk_dim, name='q_proj', **kw)(h), c.num_heads))
    k = LayerNorm(name='norm_k', **norm)(split(nn.Dense(c.qk_dim, name='k_proj', **kw)(h), 1))
    v = LayerNorm(name='norm_v', **norm)(split(nn.Dense(c.v_dim, name='v_proj', **kw)(h), 1))
    positions = jnp.arange(x.shape[-2])
    q = apply_rope(q, positions, c.rope_max_position)
    k = apply_rope(k, positions, c.rope_max_position)
    logits = _f32(jnp.einsum('bqhc,bkc->bhqk', q, k[..., 0, :])) / math.sqrt(c.qk_dim)
    if attention_bias is not None:
      logits = logits + _f32(attention_bias)
    cap = c.logits_soft_cap
    logits = jnp.tanh(logits / cap) * cap
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum('bhqk,bkc->bqhc', weights, v[..., 0, :])
    y = y.reshape(y.shape[:-2] + (-1,))
    y = nn.Dense(x.shape[-1], name='linear_embedding', dtype=self.dtype, param_dtype=self.param_dtype)(y)
    return RMSBatchNorm(name='final_norm', **norm)(y)


class MLPBlock(nn.Module):
  """`final_norm(fc2(relu(fc1(norm(x)))))` (no residual: the block adds it)."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSBatchNorm(name='norm', param_dtype=self.param_dtype)(x)
    h = jax.nn.relu(nn.Dense(self.config.mlp_ratio * x.shape[-1], name='fc1', **kw)(h))
    h = nn.Dense(x.shape[-1], name='fc2', **kw)(h)
    return RMSBatchNorm(name='final_norm', param_dtype=self.param_dtype)(h)


class AttentionBiasBlock(nn.Module):
  """Pair activations `(batch, P, P, pair_width)` -> attention bias `(batch, heads, P*pool, P*pool)`."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pair: Array) -> Array:
    c = self.config
    h = gelu_exact(RMSBatchNorm(name='norm', param_dtype=self.param_dtype)(pair))
    h = nn.Dense(c.num_heads, use_bias=False, name='proj', dtype=self.dtype, param_dtype=self.param_dtype)(h)
    h = repeat(repeat(h, c.pair_pool, axis=1), c.pair_pool, axis=2)
    return jnp.moveaxis(h, -1, 1)


def central_mask_features(distances: np.ndarray, feature_size: int, max_distance: int) -> np.ndarray:
  """`[width_i > distance]` for exponentially spaced widths `i + geomspace(1, max - n + 1)` (float32, as the port)."""
  log_step = np.log(float(max_distance - feature_size + 1)) / feature_size
  geom = np.exp(np.float32(0.0) + np.arange(feature_size, dtype=np.float32) * np.float32(log_step))
  widths = np.arange(feature_size, dtype=np.float32) + geom.astype(np.float32)
  return (widths > distances[..., None]).astype(np.float32)


def relative_position_features(length: int, heads: int, max_distance: int) -> np.ndarray:
  """Features of the relative positions `-length ... length - 1`: `(2 length, 2 heads)`."""
  offsets = np.arange(-length, length, dtype=np.float32)
  features = central_mask_features(np.abs(offsets), heads, max_distance)
  return np.concatenate([features, np.sign(offsets)[:, None] * features], axis=-1)


def relative_shift(x: Array) -> Array:
  """`(..., q, 2q)` scores against relative offsets -> `(..., q, q)` scores against absolute positions."""
  *batch, q, two_q = x.shape
  x = x.reshape(*batch, two_q, q)[..., 1:, :]
  return x.reshape(*batch, q, two_q - 1)[..., :q]


class SequenceToPairBlock(nn.Module):
  """The trunk, pooled by `pair_pool`, as pair activations: an outer product with relative positions.

  `a[i, j, h] = q_i·k_j + (q_i + q_r)·r_{j-i} / 2 + (k_j + k_r)·r_{i-j} / 2` over `pair_heads`
  heads, projected to `pair_width` and added to per-position terms of both ends.
  """

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    heads, dim = c.pair_heads, c.pair_head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(rms_norm=True, name='norm_seq2pair', param_dtype=self.param_dtype)(avg_pool(x, c.pair_pool))
    batch, length = h.shape[:2]
    q = nn.Dense(heads * dim, use_bias=False, name='linear_q', **kw)(h).reshape(batch, length, heads, dim)
    k = nn.Dense(heads * dim, use_bias=False, name='linear_k', **kw)(h).reshape(batch, length, heads, dim)
    features = relative_position_features(length, heads, c.rope_max_position // c.pair_pool)
    pos = nn.Dense(heads * dim, name='linear_pos_features', **kw)(jnp.asarray(features, h.dtype))
    pos = pos.reshape(2 * length, heads, dim)
    q_r_bias = self.param('q_r_bias', nn.initializers.zeros, (1, 1, heads, dim), self.param_dtype)
    k_r_bias = self.param('k_r_bias', nn.initializers.zeros, (1, 1, heads, dim), self.param_dtype)
    rel_q = relative_shift(jnp.einsum('bqhc,phc->bhqp', q + q_r_bias.astype(q.dtype), pos))
    rel_k = relative_shift(jnp.einsum('bkhc,phc->bhkp', k + k_r_bias.astype(k.dtype), pos))
    a = jnp.einsum('bqhc,bkhc->bqkh', q, k)
    a = a + 0.5 * (jnp.moveaxis(rel_q, 1, -1) + jnp.einsum('bhkq->bqkh', rel_k))
    g = gelu_exact(h)
    y_q = nn.Dense(c.pair_width, use_bias=False, name='linear_y_q', **kw)(g)
    y_k = nn.Dense(c.pair_width, use_bias=False, name='linear_y_k', **kw)(g)
    return nn.Dense(c.pair_width, name='linear_pair', **kw)(a) + y_q[:, :, None] + y_k[:, None, :]


class RowAttentionBlock(nn.Module):
  """Attention along each row of the pair activations (no residual: the pair update adds it)."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pair: Array) -> Array:
    width = pair.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(rms_norm=True, name='norm', param_dtype=self.param_dtype)(pair)
    q = nn.Dense(width, use_bias=False, name='linear_q', **kw)(h)
    k = nn.Dense(width, use_bias=False, name='linear_k', **kw)(h)
    v = nn.Dense(width, name='linear_v', **kw)(h)
    logits = _f32(jnp.einsum('bpqf,bpkf->bpqk', q, k)) / math.sqrt(width)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bpqk,bpkf->bpqf', weights, v)


class PairMLPBlock(nn.Module):
  """`linear2(relu(linear1(norm(pair))))` (no residual: the pair update adds it)."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pair: Array) -> Array:
    width = pair.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(rms_norm=True, name='norm', param_dtype=self.param_dtype)(pair)
    h = jax.nn.relu(nn.Dense(2 * width, name='linear1', **kw)(h))
    return nn.Dense(width, name='linear2', **kw)(h)


class PairUpdateBlock(nn.Module):
  """`pair = pair + seq2pair(x); pair = pair + row_attn(pair); pair + pair_mlp(pair)`."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pair: Array | None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = SequenceToPairBlock(self.config, name='seq2pair', **kw)(x)
    pair = y if pair is None else pair + y
    pair = pair + RowAttentionBlock(self.config, name='row_attn', **kw)(pair)
    return pair + PairMLPBlock(self.config, name='pair_mlp', **kw)(pair)


class TowerBlock(nn.Module):
  """One transformer block (the port's `ModuleDict`): pair update (even blocks), bias, MHA, MLP."""

  config: AlphaGenomeConfig
  has_pair_update: bool
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, pair: Array | None) -> tuple[Array, Array | None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.has_pair_update:
      pair = PairUpdateBlock(self.config, name='pair_update', **kw)(x, pair)
    bias = AttentionBiasBlock(self.config, name='attn_bias', **kw)(pair)
    x = x + MHABlock(self.config, name='mha', **kw)(x, bias)
    x = x + MLPBlock(self.config, name='mlp', **kw)(x)
    return x, pair


class TransformerTower(nn.Module):
  """Trunk `(batch, positions, trunk_width)` -> (trunk, pair activations `(batch, P, P, pair_width)`)."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    pair = None
    for i in range(self.config.num_blocks):
      x, pair = TowerBlock(self.config, i % 2 == 0, dtype=self.dtype, param_dtype=self.param_dtype, name=f'blocks_{i}')(
        x, pair
      )
    return x, pair
