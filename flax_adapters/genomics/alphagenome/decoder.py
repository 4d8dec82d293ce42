"""The sequence decoder: a U-Net from the 128 bp trunk back to 1 bp, one up block per encoder level.

Paths mirror the port: `decoder.up_blocks.N.{conv_in,pointwise,conv_out}` and `residual_scale`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_adapters.genomics.alphagenome.config import AlphaGenomeConfig
from flax_adapters.genomics.alphagenome.layers import ConvBlock, repeat

Array = jax.Array


class UpResBlock(nn.Module):
  """`h = conv_in(x) + x[..., :skip]`, upsampled 2x and scaled; `+ pointwise(skip)`; `h + conv_out(h)`."""

  features: int
  kernel_size: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ConvBlock(self.features, self.kernel_size, name='conv_in', **kw)(x) + x[..., : self.features]
    residual_scale = self.param('residual_scale', nn.initializers.ones, (1,), self.param_dtype)
    h = repeat(h, 2, axis=-2) * residual_scale.astype(h.dtype)
    h = h + ConvBlock(self.features, 1, name='pointwise', **kw)(skip)
    return h + ConvBlock(self.features, self.kernel_size, name='conv_out', **kw)(h)


class SequenceDecoder(nn.Module):
  """Trunk `(batch, length / 128, trunk_width)` and the encoder's skips -> `(batch, length, stem_width)`."""

  config: AlphaGenomeConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skips: list[Array]) -> Array:
    c = self.config
    for i, skip in enumerate(reversed(skips)):
      x = UpResBlock(
        skip.shape[-1], c.conv_kernel, dtype=self.dtype, param_dtype=self.param_dtype, name=f'up_blocks_{i}'
      )(x, skip)
    return x
