"""A small model with every kind of layer the adapters handle, for the core tests.

Dense, DenseGeneral attention kernels (d -> (heads, head_dim) and back), an Einsum layer, Conv1D,
Conv2D, a grouped conv, LayerNorm/RMSNorm, named `mha`/`mlp` sub-blocks and heads that follow the
heads protocol (`heads` field, params under params['heads'][name]).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

D, H, HD, L, C_IN, BLOCKS = 16, 2, 8, 12, 4, 2
CONV1_FEATURES, CONV2_FEATURES, CONV1_K, CONV2_K = 8, 4, 5, (3, 3)


class MHA(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    q = nn.DenseGeneral((H, HD), name='q_proj', **kw)(x)
    k = nn.DenseGeneral((H, HD), name='k_proj', **kw)(x)
    v = nn.DenseGeneral((H, HD), name='v_proj', **kw)(x)
    att = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(HD), axis=-1)
    o = jnp.einsum('bhqk,bkhd->bqhd', att, v)
    return nn.DenseGeneral(D, axis=(-2, -1), name='o_proj', **kw)(o)


class MLP(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    h = nn.RMSNorm(name='norm', **kw)(x)
    h = nn.gelu(nn.Dense(2 * D, name='fc1', **kw)(h))
    return nn.Dense(D, name='fc2', **kw)(h)


class Block(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = x + MHA(name='mha', dtype=self.dtype)(nn.LayerNorm(name='norm', **kw)(x))
    return x + MLP(name='mlp', dtype=self.dtype)(x)


class Heads(nn.Module):
  specs: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return {n: nn.Dense(s['num_tracks'], name=n, dtype=self.dtype, param_dtype=self.dtype)(x) for n, s in self.specs}


class TestNet(nn.Module):
  """(batch, L, C_IN) -> {head: (batch, L, tracks)}."""

  heads: Any = (('atac', {'modality': 'atac', 'num_tracks': 3}), ('dnase', {'modality': 'dnase', 'num_tracks': 2}))
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    b = x.shape[0]
    h = nn.Conv(CONV1_FEATURES, (CONV1_K,), name='conv1d', **kw)(x)
    h = nn.LayerNorm(name='conv_norm', **kw)(nn.gelu(h))
    h = nn.Conv(CONV1_FEATURES, (3,), feature_group_count=2, name='grouped_conv', **kw)(h)
    g = nn.Conv(CONV2_FEATURES, CONV2_K, padding='SAME', name='conv2d', **kw)(h[..., None])
    h = nn.Dense(D, name='stem_proj', **kw)(g.reshape(b, L, -1))
    h = nn.Einsum((D, D), 'bld,de->ble', name='mix', **kw)(h)
    for i in range(BLOCKS):
      h = Block(name=f'blocks_{i}', dtype=self.dtype)(h)
    h = nn.LayerNorm(name='final_norm', **kw)(h)
    return Heads(tuple(self.heads), name='heads', dtype=self.dtype)(h)


def make(dtype=jnp.float32, batch=2, seed=0):
  model = TestNet(dtype=dtype)
  x = jax.random.normal(jax.random.key(seed + 1), (batch, L, C_IN), dtype)
  params = model.init(jax.random.key(seed), x)['params']
  return model, params, x
