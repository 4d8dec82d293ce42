"""Forward-mode autodiff through every shipped model, plain and LoRA-adapted.

`jax.jvp` of a scalar function of the params (float64) equals a central finite difference
`(f(p + eps·t) - f(p - eps·t)) / (2·eps)` along a random tangent `t`; the finite difference's
error is O(eps²) ~ 1e-10 relative, so the tolerance is 1e-6 relative. The models' speed paths
(GPT-2's fused LM head + cross-entropy, the flattened-token Dense, the attention) are plain JAX or
`jax.custom_jvp` rules, so this holds for each of them; `jax.jacfwd` (a vmapped jvp) is checked
against `jax.jacrev` on the fused loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_adapters as fa
from flax_adapters.genomics.seq2func import Seq2Func, Seq2FuncConfig
from flax_adapters.models import layers
from flax_adapters.models.bert import BertConfig, BertModel
from flax_adapters.models.gpt2 import GPT2Config, GPT2LMHeadModel
from flax_adapters.models.llama import LlamaConfig, LlamaForCausalLM

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
EPS = 1e-6
RTOL = 1e-6


def _gpt2(tie=True):
  cfg = GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=tie)
  return GPT2LMHeadModel(cfg, **F64), ['c_attn']


def _llama():
  cfg = LlamaConfig(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
  )
  return LlamaForCausalLM(cfg, **F64), ['q_proj', 'v_proj']


def _bert():
  cfg = BertConfig(
    vocab_size=37,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
  )
  return BertModel(cfg, **F64), ['query', 'value']


def _token_inputs():
  ids = jax.random.randint(jax.random.key(7), (2, 6), 0, 37)
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  return (ids, mask)


def _dna_inputs():
  cfg = Seq2FuncConfig.tiny()
  tokens = jax.random.randint(jax.random.key(7), (2, cfg.seq_len), 0, 4)
  return (jax.nn.one_hot(tokens, 4, dtype=jnp.float64),)


def _seq2func():
  return Seq2Func(Seq2FuncConfig.tiny(), **F64), ['q_proj', 'v_proj']


def _scalar(outputs):
  """A smooth scalar of every output leaf (sin keeps it away from a linear function)."""
  return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(outputs) if o is not None)


MODELS = {
  'seq2func': (_seq2func, _dna_inputs, {}),
  'bert': (_bert, _token_inputs, {}),
  'llama': (_llama, _token_inputs, {}),
  'gpt2': (_gpt2, _token_inputs, {}),
  'gpt2_untied': (lambda: _gpt2(tie=False), _token_inputs, {}),
  # GPT-2's fused LM head + cross-entropy (`layers.tied_head_cross_entropy`, a custom_jvp rule).
  'gpt2_loss': (_gpt2, lambda: _token_inputs()[:1], {'method': 'loss'}),
}


def _random_like(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _check_jvp_against_finite_difference(f, primal, tangent):
  # Jitted: op by op, a float64 Seq2Func's jvp and two forwards took 43 s of dispatch.
  value, derivative = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(primal, tangent)
  f = jax.jit(f)
  step = lambda s: f(jax.tree.map(lambda p, t: p + s * t, primal, tangent))
  fd = (step(EPS) - step(-EPS)) / (2 * EPS)
  assert np.isfinite(float(value))
  assert abs(float(derivative)) > 1e-8, 'a zero derivative would not test anything'
  assert abs(float(derivative) - float(fd)) <= RTOL * max(1.0, abs(float(fd))), (float(derivative), float(fd))


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('adapted', [False, True], ids=['plain', 'lora'])
def test_jvp_equals_finite_difference(name, adapted):
  build, inputs, kwargs = MODELS[name]
  with jax.enable_x64(True):
    model, targets = build()
    args = inputs()
    params = model.init(jax.random.key(0), *args)['params']
    if adapted:
      cfg = fa.TransferConfig(mode='lora', lora_rank=2, lora_alpha=4, lora_targets=targets, unfreeze_norm=False)
      model, params = fa.prepare_for_transfer(model, params, cfg, *args)
      # B starts at zero; give it a value so the adapters contribute to the output.
      params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if getattr(path[-1], 'key', None) == 'lora_b' else x, params
      )
      trainable, frozen = fa.partition(params, fa.trainable_mask(model, params))
      f = lambda t: _scalar(model.apply({'params': fa.combine(t, frozen)}, *args, **kwargs))
      primal = trainable
    else:
      f = lambda p: _scalar(model.apply({'params': p}, *args, **kwargs))
      primal = params
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(primal))
    _check_jvp_against_finite_difference(f, primal, _random_like(primal, jax.random.key(1)))


@pytest.mark.parametrize('tile', [None, 8], ids=['one_tile', 'tiles'])
def test_fused_gpt2_loss_jacfwd_equals_jacrev(tile, monkeypatch):
  """`jax.jacfwd` (vmapped jvp, so the custom_jvp rule is batched) equals `jax.jacrev` on the
  fused head + loss with the token embedding frozen (the streamed head; with `tile`, several
  vocabulary tiles and a remainder)."""
  if tile:
    monkeypatch.setattr(layers, '_VOCAB_TILE', tile)
  with jax.enable_x64(True):
    model, _ = _gpt2()
    (ids,) = _token_inputs()[:1]
    params = model.init(jax.random.key(0), ids)['params']
    wpe = params['transformer']['wpe']['embedding']

    def loss(w):
      p = {**params, 'transformer': {**params['transformer'], 'wpe': {'embedding': w}}}
      return model.apply({'params': p}, ids, method='loss')

    fwd, rev = jax.jacfwd(loss)(wpe), jax.jacrev(loss)(wpe)
    assert float(jnp.max(jnp.abs(fwd))) > 1e-8
    np.testing.assert_allclose(fwd, rev, rtol=1e-9, atol=1e-12)


def test_gpt2_attention_rule_equals_plain_autodiff():
  """GPT-2's attention (a custom_jvp rule) against the same attention in plain jnp, float64, with a
  padding mask that blocks whole rows: values, jvp and reverse-mode gradients agree to 1e-12."""
  from flax_adapters.models import gpt2

  def plain(qkv, mask, scale):
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('btnh,bsnh->bnts', q, k) * scale
    t = qkv.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool)) & mask
    probs = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', probs, v)

  with jax.enable_x64(True):
    qkv = jax.random.normal(jax.random.key(0), (2, 5, 3, 2, 4), jnp.float64)
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], bool)[:, None, None, :]
    tangent = jax.random.normal(jax.random.key(1), qkv.shape, jnp.float64)
    weights = jax.random.normal(jax.random.key(2), (2, 5, 2, 4), jnp.float64)
    ours = lambda x: gpt2.causal_attention(x, mask, 0.5)
    ref = lambda x: plain(x, mask, 0.5)
    np.testing.assert_allclose(ours(qkv), ref(qkv), atol=1e-12)
    np.testing.assert_allclose(jax.jvp(ours, (qkv,), (tangent,))[1], jax.jvp(ref, (qkv,), (tangent,))[1], atol=1e-12)
    grad = lambda f: jax.grad(lambda x: jnp.sum(weights * f(x)))(qkv)
    np.testing.assert_allclose(grad(ours), grad(ref), atol=1e-12)
