"""Building blocks shared by the model families: activations, RMSNorm and attention.

Everything here reproduces the numerics of the corresponding Hugging Face PyTorch code, so that a
converted checkpoint gives the same outputs (to float32 rounding) as `transformers`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype | type


def at_least_f32(dtype) -> jnp.dtype:
  """float32 for half-precision (and float32) dtypes, float64 for float64: where the models keep
  statistics, softmax and logits, so float64 runs stay float64 throughout.

  Examples:
    >>> at_least_f32(jnp.bfloat16).name
    'float32'
  """
  return jnp.promote_types(dtype, jnp.float32)


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
  """RMS normalisation exactly as HF `LlamaRMSNorm`: statistics in float32 (or float64), the result cast back
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
    x32 = x.astype(at_least_f32(x.dtype))
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100) -> jax.Array:
  """Mean cross-entropy over the labels that are not `ignore_index`, as `torch.nn.CrossEntropyLoss()`.

  Computed in float32 (float64 for float64 logits) whatever the logits' dtype. The label's logit
  is picked by a masked sum over the vocabulary rather than a gather, so the gradient is one
  elementwise `softmax - onehot` pass (a gather's gradient is a scatter into a zero tensor of the
  logits' size); plain `jnp`, so both reverse and forward mode work. As in torch, the mean over zero counted
  labels is NaN.

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
  dtype = at_least_f32(logits.dtype)
  weights = valid.astype(dtype) / jnp.sum(valid).astype(dtype)
  x = logits.astype(dtype)
  onehot = jnp.where(valid, labels, 0)[..., None] == jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1)
  picked = jnp.sum(jnp.where(onehot, x, 0.0), axis=-1)
  return jnp.sum(weights * (jax.nn.logsumexp(x, axis=-1) - picked))


# Vocabulary rows per tile when only the loss and d/dh are wanted (`_head_ce_streamed`): the
# [tokens, tile] logits of GPT-2 small at 4 x 128 tokens are 4 MB, so they stay in cache between
# the GEMM that makes them and the GEMM that uses them (1024-4096 measure alike on the benchmark's
# machine; 8192 is slower).
_VOCAB_TILE = 2048


def _head_ce_streamed(h, embedding, labels, weights, *, grads: bool):
  """Per-row losses and, with `grads`, d loss/d h, a vocabulary tile at a time (frozen embedding).

  An online softmax, as in flash attention: each tile's logits update the running row max `m`,
  the running sum `s` of `exp(logits - m)`, and the running `acc = Σ exp(logits - m)·E_tile`,
  rescaled when `m` grows. At the end `lse = m + log s` and `d loss/d h = w·(acc/s - E[label])`,
  since `softmax·E = acc/s`. The FLOPs are those of the unfused head (the logits GEMM and the `dh`
  GEMM), but no `[tokens, vocab]` array is ever written: one pass over cached tiles instead of
  four over the 100 MB logits of GPT-2 small (`-stream_head` in benchmarks/README.md's ablation).
  """
  n, d = h.shape
  vocab = embedding.shape[0]
  f32 = at_least_f32(h.dtype)
  tile = min(_VOCAB_TILE, vocab)
  full_tiles = vocab // tile

  def update(carry, e_tile):
    m, s, acc = carry
    logits = jax.lax.dot_general(h, e_tile, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new)
    s = s * rescale + jnp.sum(p, axis=-1, keepdims=True)
    if grads:
      acc = acc * rescale + jnp.dot(p.astype(h.dtype), e_tile, preferred_element_type=f32)
    return m_new, s, acc

  # The lowest finite value, not -inf: exp(m - m_new) is then 0 with a finite derivative.
  carry = (jnp.full((n, 1), jnp.finfo(f32).min, f32), jnp.zeros((n, 1), f32), jnp.zeros((n, d) if grads else (), f32))
  carry = jax.lax.fori_loop(
    0, full_tiles, lambda i, c: update(c, jax.lax.dynamic_slice_in_dim(embedding, i * tile, tile)), carry
  )
  if full_tiles * tile < vocab:
    carry = update(carry, embedding[full_tiles * tile :])
  m, s, acc = carry
  lse = m + jnp.log(s)
  e_label = jnp.take(embedding, labels, axis=0).astype(f32)
  nll = lse[:, 0] - jnp.sum(h.astype(f32) * e_label, axis=-1)
  if not grads:
    return nll, None
  return nll, (acc / s - e_label) * weights[:, None]


def _head_ce_logits(h, embedding, labels, weights):
  """Per-row losses, d loss/d h and d loss/d embedding, from the whole `[tokens, vocab]` logits.

  The embedding's gradient `dlogitsᵀ·h` needs the final softmax of every row, so here the logits
  are formed once and kept (a streamed pass would have to compute them twice).
  """
  f32 = at_least_f32(h.dtype)
  logits = jax.lax.dot_general(h, embedding, (((1,), (1,)), ((), ())), preferred_element_type=f32)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  lse = m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
  # A gather: inside the rule this is never transposed (a masked sum would be a full pass).
  nll = lse[:, 0] - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  # d loss / d logits = w · (softmax - onehot): known here, since the loss is the output. The
  # softmax is exp(logits - lse), not exp(logits - max) / sum: then no exp(logits - max) array is
  # shared by the sum and this pass, so XLA fuses each exp into its consumer instead of keeping a
  # second [rows, vocab] array (100 MB for GPT-2 small) between them.
  onehot = labels[:, None] == jax.lax.broadcasted_iota(labels.dtype, logits.shape, 1)
  dlogits = ((jnp.exp(logits - lse) - onehot) * weights[:, None]).astype(h.dtype)
  dh = jax.lax.dot_general(dlogits, embedding, (((1,), (0,)), ((), ())), preferred_element_type=f32)
  de = jax.lax.dot_general(dlogits, h, (((0,), (0,)), ((), ())), preferred_element_type=f32)
  return nll, dh, de


@jax.custom_jvp
def _tied_head_ce(h, embedding, labels, weights):
  nll = _head_ce_streamed(h, embedding, labels, weights, grads=False)[0]
  return jnp.sum(weights * nll)


def _tied_head_ce_jvp(primals, tangents):
  # The loss is a scalar, so its derivative is the gradient: computed here with the loss, and the
  # tangent is its inner product with the input tangents. That is linear in the tangents, so JAX
  # transposes it for reverse mode (the backward pass only scales the stored gradients), and it
  # is plain JAX in the primals, so higher derivatives work too. symbolic_zeros: an input with no
  # tangent (a frozen embedding, under LoRA) gets no gradient GEMM.
  h, embedding, labels, weights = primals
  t_h, t_e, _, t_w = tangents
  want_dh, want_de = not _is_zero(t_h), not _is_zero(t_e)
  if want_de:
    nll, dh, de = _head_ce_logits(h, embedding, labels, weights)
  else:
    (nll, dh), de = _head_ce_streamed(h, embedding, labels, weights, grads=want_dh), None
  loss = jnp.sum(weights * nll)
  tangent = jnp.zeros_like(loss)
  if want_dh:
    tangent += jnp.sum(dh * t_h.astype(dh.dtype))
  if want_de:
    tangent += jnp.sum(de * t_e.astype(de.dtype))
  if not _is_zero(t_w):
    tangent += jnp.sum(nll * t_w)
  return loss, tangent


def _is_zero(t) -> bool:
  return isinstance(t, jax.custom_derivatives.SymbolicZero)


_tied_head_ce.defjvp(_tied_head_ce_jvp, symbolic_zeros=True)


def tied_head_cross_entropy(
  h: jax.Array, embedding: jax.Array, labels: jax.Array, *, ignore_index: int = -100
) -> jax.Array:
  """`cross_entropy(h · embeddingᵀ, labels)` without ever holding all the logits.

  The language-model head and the loss run fused: the logits give the loss terms and, since the
  loss is a scalar output, its gradient `w·(softmax - onehot)` right away, which is projected back
  to `d/dh` (and, if the embedding trains, to `d/d embedding`) when the loss is differentiated; the
  backward pass only scales these by the incoming cotangent. The FLOPs are those of the unfused
  head (forward GEMM, `dh` GEMM and, when the embedding trains, its gradient GEMM; nothing is
  recomputed), but no `[tokens, vocab]` array is kept between the passes. With a frozen embedding
  (LoRA) its gradient GEMM is skipped and the vocabulary goes a tile at a time (an online softmax),
  so no `[tokens, vocab]` array is formed at all. Logits and the softmax are float32 (float64 for
  float64 inputs) whatever the input dtype. The rule is a `jax.custom_jvp`, so `jax.jvp`,
  `jax.jacfwd` and `jax.grad` all work.

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
  dtype = at_least_f32(h.dtype)
  weights = valid.astype(dtype) / jnp.sum(valid).astype(dtype)
  return _tied_head_ce(h.reshape(-1, d), embedding, jnp.where(valid, labels, 0), weights)


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general` for `nn.Dense(dot_general=token_dot_general)`: the same product, with the
  input's leading axes flattened into one token axis first.

  Plain JAX (any autodiff mode). On CPU it lays out the kernel gradient as one
  `[tokens, in]ᵀ·[tokens, out]` GEMM: with the batch axes apart, reverse mode yields
  `transpose(dot(g, x))`, which XLA:CPU runs as a transposed copy of `g` and a slower GEMM.

  Examples:
    >>> x, k = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    >>> token_dot_general(x, k, (((2,), (0,)), ((), ()))).shape
    (2, 3, 5)
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  dot = functools.partial(
    jax.lax.dot_general, precision=precision, preferred_element_type=preferred_element_type, **kwargs
  )
  if lhs_batch or rhs_batch or lhs.ndim <= 2 or tuple(lhs_contract) != (lhs.ndim - 1,):
    return dot(lhs, rhs, dimension_numbers)
  y = dot(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), tuple(rhs_contract)), ((), ())))
  return y.reshape(lhs.shape[:-1] + y.shape[1:])


def check_ids(ids, limit: int, *, argument: str, field: str) -> None:
  """Refuse ids outside `[0, limit)` when they are concrete (an embedding lookup outside its table gives
  NaN, or a wrong row, where torch raises). Traced ids (under jit) cannot be read and pass unchecked.

  Examples:
    >>> check_ids(jnp.array([[0, 5]]), 4, argument='input_ids', field='vocab_size')
    Traceback (most recent call last):
    ValueError: `input_ids` holds ids in [0, 5], but the model has vocab_size=4 rows; ...
  """
  if ids is None or isinstance(ids, jax.core.Tracer):
    return
  values = np.asarray(ids)
  if values.size and (values.min() < 0 or values.max() >= limit):
    raise ValueError(
      f'`{argument}` holds ids in [{values.min()}, {values.max()}], but the model has {field}={limit} rows; '
      f'an id outside [0, {limit}) reads NaN or a wrong embedding. Check the tokenizer / ids against the config.'
    )


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
  Softmax runs in float32 (float64 for float64 inputs), as in HF's eager and SDPA paths. Without
  dropout this is `jax.nn.dot_product_attention` with the implementation JAX picks (XLA's, which
  both autodiff modes go through; its cuDNN kernel would be reverse-mode only); with dropout on the
  probabilities (training), or in float64 (that function's softmax is always float32), it is the
  same computation written out.

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
  dropout = dropout_rng is not None and dropout_rate > 0.0
  softmax_dtype = at_least_f32(query.dtype)
  if not dropout and softmax_dtype == jnp.float32:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=is_causal)

  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  # Heads sharing a key/value head are a separate axis, so no copy of K/V is made.
  grouped = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum('btkgh,bskh->bkgts', grouped, key, preferred_element_type=softmax_dtype)
  logits = logits * scale
  allowed = jnp.ones((q_len, kv_len), dtype=bool)
  if is_causal:
    allowed = jnp.tril(allowed)
  allowed = allowed[None, None, None]
  if mask is not None:
    allowed = allowed & mask[:, :, None]  # [B, 1, 1, T|1, S]
  logits = jnp.where(allowed, logits, jnp.finfo(softmax_dtype).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.astype(value.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, value)
  return out.reshape(batch, q_len, num_heads, head_dim)
