"""AlphaGenome's building blocks: its GELU, batch-RMS and layer norms, weight-standardized conv.

Arrays are channels-last, `(batch, length, channels)`. Non-trained tensors of the pretrained model
(the norms' running variances, the heads' track means) live in the `'buffers'` collection, so that
`'params'` holds exactly what can train: `model.apply({'params': p, 'buffers': b}, ...)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flax_adapters.genomics.seq2func import StandardizedConv1D

Array = jax.Array
BUFFERS = 'buffers'
EPS = 1e-5


def gelu(x: Array) -> Array:
  """AlphaGenome's GELU: `x * sigmoid(1.702 x)`."""
  return jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x) * x


def gelu_exact(x: Array) -> Array:
  """The erf GELU, which the attention-bias and sequence-to-pair blocks use."""
  return jax.nn.gelu(x, approximate=False)


class RMSBatchNorm(nn.Module):
  """`x * scale / sqrt(running_var + eps) + bias` over the last axis (frozen batch statistics).

  `scale` and `bias` are params; `running_var` is a buffer (never trained).
  """

  adapter_kind = 'norm'

  eps: float = EPS
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    var = self.variable(BUFFERS, 'running_var', lambda: jnp.ones((c,), self.param_dtype)).value
    inv = scale * jax.lax.rsqrt(var + self.eps).astype(x.dtype)
    return x * inv.astype(x.dtype) + bias.astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm (or RMS norm, `rms_norm=True`) over the last axis, statistics in float32, with scale and bias."""

  adapter_kind = 'norm'

  rms_norm: bool = False
  eps: float = EPS
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if not self.rms_norm:
      h = h - jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
    y = (h * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return y * scale.astype(x.dtype) + bias.astype(x.dtype)


class StandardizedConv1d(StandardizedConv1D):
  """AlphaGenome's weight-standardized conv: `(w - mean) / sqrt(max(fan_in * var, 1e-4)) * scale`.

  The statistics are per output channel over the kernel's width and input axes. Like its parent
  `flax_adapters.genomics.seq2func.StandardizedConv1D` it declares `adapter_mergeable = False`:
  the standardization is recomputed on every call, so a Locon delta cannot fold into the kernel.
  """

  eps: float = 1e-4
  padding: Any = 'SAME'

  def standardized_kernel(self, kernel: Array, scale: Array | None) -> Array:
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    k = kernel.astype(dtype)
    mean = jnp.mean(k, axis=(0, 1), keepdims=True)
    var = jnp.var(k, axis=(0, 1), keepdims=True)
    fan_in = k.shape[0] * k.shape[1]
    w = (k - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, jnp.asarray(self.eps, dtype)))
    if scale is not None:
      w = w * scale.astype(dtype)
    return w


class ConvBlock(nn.Module):
  """`conv(gelu(norm(x)))`; a width-1 conv is a plain `nn.Conv`, wider ones are standardized."""

  features: int
  kernel_size: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = gelu(RMSBatchNorm(param_dtype=self.param_dtype, name='norm')(x))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name='conv')
    if self.kernel_size == 1:
      return nn.Conv(self.features, (1,), **kw)(h)
    return StandardizedConv1d(self.features, (self.kernel_size,), **kw)(h)


def max_pool(x: Array, size: int = 2) -> Array:
  """Max-pool along the length axis (lengths here are always multiples of `size`)."""
  return nn.max_pool(x, (size,), strides=(size,))


def avg_pool(x: Array, size: int) -> Array:
  return nn.avg_pool(x, (size,), strides=(size,))


def repeat(x: Array, times: int, axis: int) -> Array:
  """Upsample by repeating each position `times` times (torch's `repeat_interleave`)."""
  return jnp.repeat(x, times, axis=axis)


def logspace_like_torch(end_exponent: float, steps: int) -> np.ndarray:
  """`torch.logspace(0, end_exponent, steps, dtype=float32)`, bit for bit.

  torch computes the exponents in float64 from float32 endpoints, counting the second half back
  from the end, and rounds the powers to float32; numpy's and jax's logspace round differently,
  and the rotary frequencies feed cosines of positions in the thousands.
  """
  start, end = np.float64(np.float32(0.0)), np.float64(np.float32(end_exponent))
  i = np.arange(steps)
  step = (end - start) / (steps - 1) if steps > 1 else 0.0
  exponent = np.where(i < steps // 2, start + step * i, end - step * (steps - i - 1))
  return np.power(10.0, exponent).astype(np.float32)


def rope_inverse_frequencies(dim: int, max_position: int) -> np.ndarray:
  """AlphaGenome's rotary frequencies: `1 / (arange(dim/2) + geomspace(1, max_position - dim/2 + 1))`."""
  n = dim // 2
  base = logspace_like_torch(np.log10(max_position - n + 1), n)
  return (np.float32(1.0) / (np.arange(n, dtype=np.float32) + base)).astype(np.float32)


def apply_rope(x: Array, positions: Array, max_position: int) -> Array:
  """Rotary encoding of `x` `(..., length, heads, dim)` at `positions` `(..., length)`.

  Feature pairs are interleaved (`(x0, x1), (x2, x3), ...`), each pair rotated by
  `position * inverse_frequency`.
  """
  inv = jnp.asarray(rope_inverse_frequencies(x.shape[-1], max_position), x.dtype)
  theta = positions.astype(x.dtype)[..., None] * inv  # (..., length, dim/2)
  theta = jnp.repeat(theta, 2, axis=-1)[..., None, :]  # (..., length, 1, dim)
  rotated = jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
  return x * jnp.cos(theta) + rotated * jnp.sin(theta)


class OrganismLinear(nn.Module):
  """A linear layer with one weight matrix per organism: `x @ kernel[organism] + bias[organism]`.

  `kernel` is `(num_organisms, in, out)`. The product is computed in float32. A head with one
  organism uses its weights for every example.
  """

  features: int
  num_organisms: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, organism_index: Array) -> Array:
    fan_in = x.shape[-1]
    # As the port: truncated normal with std 1/sqrt(fan_in), zero bias.
    init = nn.initializers.truncated_normal(1.0 / np.sqrt(fan_in), lower=-2.0, upper=2.0)
    kernel = self.param('kernel', init, (self.num_organisms, fan_in, self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.num_organisms, self.features), self.param_dtype)
    index = organism_index if self.num_organisms > 1 else jnp.zeros_like(organism_index)
    w, b = kernel[index], bias[index]  # (batch, in, out), (batch, out)
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum('b...i,bio->b...o', x.astype(f32), w.astype(f32)).astype(x.dtype)
    return y + b.reshape(b.shape[:1] + (1,) * (y.ndim - 2) + b.shape[1:]).astype(y.dtype)
