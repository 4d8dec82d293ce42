"""Building blocks shared by the model families: activations, RMSNorm and attention.

Everything here reproduces the numerics of the corresponding Hugging Face PyTorch code, so that a
converted checkpoint gives the same outputs (to float32 rounding) as `transformers`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | type


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


# Names as `transformers.activations.ACT2FN` spells them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'gelu': _gelu_exact,
  'gelu_new': _gelu_tanh,
  'gelu_pytorch_tanh': _gelu_tanh,
  'gelu_fast': _gelu_tanh,
  'relu': jax.nn.relu,
  'silu': jax.nn.silu,
  'swish': jax.nn.silu,
  'tanh': jnp.tanh,
}


def activation(name: str, *, field: str = 'hidden_act') -> Callable[[jax.Array], jax.Array]:
  """The activation function that `transformers` calls `name`.

  Examples:
    >>> float(activation('relu')(jnp.array(-1.0)))
    0.0
  """
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
      f'{field}={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}. '
      'Add it to flax_adapters.models.layers.ACTIVATIONS if it is a pointwise function.'
    ) from None


class RMSNorm(nn.Module):
  """RMS normalisation exactly as HF `LlamaRMSNorm`: statistics in float32, the result cast back
  to the input dtype before the weight multiply.

  Attributes:
    eps: added to the mean square.
    dtype: computation dtype of the output.
    param_dtype: dtype of the `scale` parameter.

  Examples:
    >>> y, _ = RMSNorm(eps=1e-6).init_with_output(jax.random.key(0), jnp.array([[3.0, 4.0]]))
    >>> y.round(3).tolist()
    [[0.849, 1.131]]
  """

  # A norm to the adapter machinery (`unfreeze_norm` trains it); the class alone would read as a block.
  adapter_kind = 'norm'

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


def _nll_sum(logits, labels, weights):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(weights * (lse - picked)), lse


@jax.custom_vjp
def _weighted_nll(logits, labels, weights):
  return _nll_sum(logits, labels, weights)[0]


def _weighted_nll_fwd(logits, labels, weights):
  loss, lse = _nll_sum(logits, labels, weights)
  return loss, (logits, labels, weights, lse)


def _weighted_nll_bwd(residuals, g):
  logits, labels, weights, lse = residuals
  # d/dlogits of w·(logsumexp - logit[label]) is w·(softmax - onehot): one elementwise pass over the
  # logits, with no scatter and no softmax kept from the forward.
  onehot = labels[..., None] == jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  grad = (probs - onehot) * (g * weights)[..., None]
  return grad.astype(logits.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100) -> jax.Array:
  """Mean cross-entropy over the labels that are not `ignore_index`, as `torch.nn.CrossEntropyLoss()`.

  Computed in float32 whatever the logits' dtype. The gradient is written as one fused
  `softmax - onehot` pass (a custom VJP), which saves XLA's scatter into a zero tensor of the
  logits' size. As in torch, the mean over zero counted labels is NaN.

  Args:
    logits: `[..., vocab]`.
    labels: int `[...]`; entries equal to `ignore_index` do not count.
    ignore_index: the label value to skip.

  Examples:
    >>> logits = jnp.array([[0.0, 0.0], [0.0, 10.0]])
    >>> round(float(cross_entropy(logits, jnp.array([0, -100]))), 4)  # log 2; the second is ignored
    0.6931
  """
  valid = labels != ignore_index
  weights = valid.astype(jnp.float32) / jnp.sum(valid).astype(jnp.float32)
  return _weighted_nll(logits, jnp.where(valid, labels, 0), weights)


# Logits per chunk in `tied_head_cross_entropy`: 32M (128 MB in float32). GPT-2 small at 4 x 128
# tokens (25M logits) is one chunk; smaller chunks (fewer rows) cost GEMM efficiency on CPU (-3%
# of the LoRA step at 2 chunks of 254 rows) for ~95 MB less memory.
_CHUNK_LOGITS = 1 << 25


def _head_ce_chunks(h, embedding, labels, weights, want_de: bool):
  """Loss, d loss/d h and (if `want_de`) d loss/d embedding, a chunk of rows at a time.

  With `want_de` the rows form one chunk, so the embedding gradient is one GEMM over all rows
  (accumulating it chunk by chunk costs a zeroed and a re-read `[vocab, d]` buffer per chunk).
  """
  n, d = h.shape
  vocab = embedding.shape[0]
  n_chunks = 1 if want_de else max(1, -(-n * vocab // _CHUNK_LOGITS))
  rows = -(-n // n_chunks)
  pad = n_chunks * rows - n
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    weights = jnp.pad(weights, (0, pad))

  def chunk(hc, lc, wc):
    logits = jax.lax.dot_general(hc, embedding, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    onehot = lc[:, None] == jax.lax.broadcasted_iota(lc.dtype, logits.shape, 1)
    picked = jnp.take_along_axis(logits, lc[:, None], axis=-1)[:, 0]
    loss = jnp.sum(wc * (m[:, 0] + jnp.log(s[:, 0]) - picked))
    # d loss / d logits = w · (softmax - onehot), known here since the loss is the output.
    dlogits = ((e * (wc[:, None] / s)) - jnp.where(onehot, wc[:, None], 0.0)).astype(h.dtype)
    dh = jax.lax.dot_general(dlogits, embedding, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    de = None
    if want_de:
      de = jax.lax.dot_general(dlogits, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return loss, dh, de

  if n_chunks == 1:
    return chunk(h, labels, weights)
  # A sequential loop, so that one chunk's logits exist at a time.
  xs = (h.reshape(n_chunks, rows, d), labels.reshape(n_chunks, rows), weights.reshape(n_chunks, rows))
  losses, dh = jax.lax.map(lambda xs: chunk(*xs)[:2], xs)
  return jnp.sum(losses), dh.reshape(n_chunks * rows, d)[:n], None


@jax.custom_vjp
def _tied_head_ce(h, embedding, labels, weights):
  return _head_ce_chunks(h, embedding, labels, weights, want_de=False)[0]


def _tied_head_ce_fwd(h, embedding, labels, weights):
  # symbolic_zeros: `.perturbed` says whether a gradient is wanted (a frozen embedding: no).
  want_de = embedding.perturbed
  loss, dh, de = _head_ce_chunks(h.value, embedding.value, labels.value, weights.value, want_de)
  dh = dh[: h.value.shape[0]].astype(h.value.dtype)
  de = None if de is None else de.astype(embedding.value.dtype)
  return loss, (dh, de)


def _tied_head_ce_bwd(residuals, g):
  dh, de = residuals
  return (g * dh).astype(dh.dtype), None if de is None else (g * de).astype(de.dtype), None, None


_tied_head_ce.defvjp(_tied_head_ce_fwd, _tied_head_ce_bwd, symbolic_zeros=True)


def tied_head_cross_entropy(
  h: jax.Array, embedding: jax.Array, labels: jax.Array, *, ignore_index: int = -100
) -> jax.Array:
  """`cross_entropy(h · embeddingᵀ, labels)` without ever holding all the logits.

  The language-model head and the loss run fused: the logits give the loss terms and, since the
  loss is a scalar output, its gradient `w·(softmax - onehot)` right away, which is projected back
  to `d/dh` (and, if the embedding trains, to `d/d embedding`) in the forward pass; the backward
  pass only scales these by the incoming cotangent. The FLOPs are those of the unfused head
  (forward GEMM, `dh` GEMM and, when the embedding trains, its gradient GEMM; nothing is
  recomputed), but no `[tokens, vocab]` array is kept between the passes. With a frozen embedding
  (LoRA) its gradient GEMM is skipped and the rows go in chunks of at most 32M logits, so only one
  chunk's logits (128 MB) exist at a time. Logits and the softmax are float32 whatever the input
  dtype.

  Args:
    h: `[..., d]` final hidden states.
    embedding: `[vocab, d]` (the tied input embedding).
    labels: int `[...]`; `ignore_index` entries do not count.
    ignore_index: the label value to skip.

  Returns:
    The mean cross-entropy over the counted labels (NaN if there are none, as in torch).

  Examples:
    >>> h, emb = jnp.ones((2, 3, 4)), jnp.eye(5, 4)
    >>> labels = jnp.array([[0, 1, -100], [2, 3, 4]])
    >>> ref = cross_entropy(h @ emb.T, labels)
    >>> bool(jnp.allclose(tied_head_cross_entropy(h, emb, labels), ref))
    True
  """
  d = h.shape[-1]
  labels = labels.reshape(-1)
  valid = labels != ignore_index
  weights = valid.astype(jnp.float32) / jnp.sum(valid).astype(jnp.float32)
  return _tied_head_ce(h.reshape(-1, d), embedding, jnp.where(valid, labels, 0), weights)


def padding_mask(attention_mask: jax.Array | None) -> jax.Array | None:
  """`[batch, kv_len]` 1/0 mask -> boolean `[batch, 1, 1, kv_len]`, broadcastable over heads/queries."""
  if attention_mask is None:
    return None
  return (jnp.asarray(attention_mask) != 0)[:, None, None, :]


def dot_product_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  scale: float,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Multi-head attention over `[batch, len, heads, head_dim]` arrays, grouped-query aware.

  `key`/`value` may have fewer heads than `query` (a divisor of it), as in grouped-query attention.
  Softmax runs in float32, as in HF's eager and SDPA paths. Without dropout this is
  `jax.nn.dot_product_attention` (fused kernels where the backend has them); with dropout on the
  probabilities (training) it is the same computation written out, since that function has no
  dropout.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with `N % K == 0`.
    value: `[B, S, K, H]`.
    scale: multiplies the logits (usually `H ** -0.5`).
    mask: boolean, broadcastable to `[B, 1, T, S]`; False blocks attention.
    is_causal: also block keys after the query position.
    dropout_rate: dropout on the attention probabilities.
    dropout_rng: PRNG key for that dropout; None means deterministic.

  Returns:
    `[B, T, N, H]`.

  Examples:
    >>> q = k = v = jnp.ones((1, 3, 4, 2))
    >>> dot_product_attention(q, k[:, :, :2], v[:, :, :2], scale=2 ** -0.5, is_causal=True).shape
    (1, 3, 4, 2)
  """
  if dropout_rng is None or dropout_rate == 0.0:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=is_causal)

  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  # Heads sharing a key/value head are a separate axis, so no copy of K/V is made.
  grouped = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum('btkgh,bskh->bkgts', grouped, key, preferred_element_type=jnp.float32)
  logits = logits * scale
  allowed = jnp.ones((q_len, kv_len), dtype=bool)
  if is_causal:
    allowed = jnp.tril(allowed)
  allowed = allowed[None, None, None]
  if mask is not None:
    allowed = allowed & mask[:, :, None]  # [B, 1, 1, T|1, S]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(value.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, value)
  return out.reshape(batch, q_len, num_heads, head_dim)
