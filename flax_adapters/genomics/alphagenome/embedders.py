"""Output embedders: the trunk and the decoder output as 128 bp, 1 bp and pair embeddings.

Each adds a learned embedding of the organism. Paths mirror the port: `embedder_128bp`,
`embedder_1bp` (`project_in`, `project_skip`, `norm`, `organism_embed`) and `embedder_pair`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_adapters.genomics.alphagenome.layers import LayerNorm, RMSBatchNorm, gelu, repeat

Array = jax.Array


class OutputEmbedder(nn.Module):
  """`gelu(norm(project_in(x) [+ project_skip(skip), upsampled]) + organism_embed[organism])`."""

  features: int
  num_organisms: int
  with_skip: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, organism_index: Array, skip: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Conv(self.features, (1,), name='project_in', **kw)(x)
    if self.with_skip:
      s = nn.Conv(self.features, (1,), use_bias=False, name='project_skip', **kw)(skip)
      h = h + repeat(s, h.shape[-2] // s.shape[-2], axis=-2)
    h = RMSBatchNorm(name='norm', param_dtype=self.param_dtype)(h)
    embed = nn.Embed(self.num_organisms, self.features, name='organism_embed', **kw)(organism_index)
    return gelu(h + embed[:, None, :])


class OutputPair(nn.Module):
  """`gelu(rms_norm((p + p^T) / 2) + organism_embed[organism])` on pair activations."""

  num_organisms: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pair: Array, organism_index: Array) -> Array:
    width = pair.shape[-1]
    h = (pair + jnp.swapaxes(pair, 1, 2)) / 2.0
    h = LayerNorm(rms_norm=True, name='norm', param_dtype=self.param_dtype)(h)
    embed = nn.Embed(self.num_organisms, width, name='organism_embed', dtype=self.dtype, param_dtype=self.param_dtype)(
      organism_index
    )
    return gelu(h + embed[:, None, None, :])
