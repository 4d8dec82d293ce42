"""The sequence encoder: a DNA embedder at 1 bp and six down blocks to the 128 bp trunk.

Paths mirror the port: `encoder.dna_embedder.{conv1,block}`, `encoder.down_blocks.N.{block1,block2}`
(each a `ConvBlock`: `norm`, `conv`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_adapters.genomics.alphagenome.config import AlphaGenomeConfig
from flax_adapters.genomics.alphagenome.layers import ConvBlock, max_pool

Array = jax.Array


class DnaEmbedder(nn.Module):
  """`h = conv1(dna); h + block(h)`: a plain 15-wide conv, then a standardized conv block."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Conv(c.stem_width, (c.stem_kernel,), padding='SAME', name='conv1', **kw)(x)
    return h + ConvBlock(c.stem_width, c.conv_kernel, name='block', **kw)(h)


class DownResBlock(nn.Module):
  """`h = block1(x) + pad(x); h + block2(h)`, widening by `width_step` (the residual is zero-padded)."""

  features: int
  kernel_size: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ConvBlock(self.features, self.kernel_size, name='block1', **kw)(x)
    h = h + jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.features - x.shape[-1])])
    return h + ConvBlock(self.features, self.kernel_size, name='block2', **kw)(h)


class SequenceEncoder(nn.Module):
  """One-hot DNA `(batch, length, 4)` -> trunk `(batch, length / 128, trunk_width)` and the U-Net skips.

  The skips are the activations at 1, 2, 4, ..., 64 bp (before each pooling), finest first.
  """

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dna: Array) -> tuple[Array, list[Array]]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = DnaEmbedder(c, name='dna_embedder', **kw)(dna)
    skips = [x]
    x = max_pool(x)
    for i, width in enumerate(c.encoder_widths[1:]):
      x = DownResBlock(width, c.conv_kernel, name=f'down_blocks_{i}', **kw)(x)
      skips.append(x)
      x = max_pool(x)
    return x, skips
