"""The flax GPT-2 training loss and its gradients equal HF's `model(ids, labels=labels).loss.backward()`.

`GPT2LMHeadModel.loss` runs the fast paths (the token-flattened Dense, the fused head +
cross-entropy, streamed over vocabulary tiles when the embedding is frozen, the stored
residual-stream gradient); torch's autograd is the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import flax_adapters as fa
from flax_adapters.models import layers
from tests.conversion.test_gpt2 import FAMILY, VOCAB, convert, tiny_gpt2

TOL = 1e-5


def torch_loss_and_grads(hf, ids, labels):
  hf.zero_grad()
  loss = hf(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
  loss.backward()
  return float(loss.detach()), {k: p.grad.numpy() for k, p in hf.named_parameters()}


@pytest.mark.parametrize('overrides', [{}, {'tie_word_embeddings': False}], ids=['tied', 'untied'])
@pytest.mark.parametrize('tile', [None, 16], ids=['one_tile', 'tiles'])
def test_loss_and_every_gradient_match_torch(overrides, tile, rng, monkeypatch):
  if tile:  # several vocabulary tiles and a remainder in the streamed head (where it is taken)
    monkeypatch.setattr(layers, '_VOCAB_TILE', tile)
  hf = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides).train()
  config, params = convert(hf)
  model = FAMILY.flax_model(config)
  ids = rng.integers(0, VOCAB, size=(3, 16)).astype(np.int64)
  labels = ids.copy()
  labels[0, 5:9] = -100  # ignored positions count in neither mean
  ref_loss, ref_grads = torch_loss_and_grads(hf, ids, labels)

  loss, grads = jax.value_and_grad(
    lambda p: model.apply({'params': p}, jnp.asarray(ids), jnp.asarray(labels), method='loss')
  )(params)
  assert abs(float(loss) - ref_loss) < TOL
  ours = FAMILY.flax_to_torch(grads, config)
  for key, ref in ref_grads.items():
    np.testing.assert_allclose(np.asarray(ours[key]), ref, atol=TOL, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize('tile', [None, 16], ids=['one_tile', 'tiles'])
def test_frozen_embedding_takes_the_streamed_path_and_matches_torch(tile, rng, monkeypatch):
  """LoRA: the embedding (tied head) is frozen, so its gradient is never formed; the rest agrees."""
  if tile:
    monkeypatch.setattr(layers, '_VOCAB_TILE', tile)
  hf = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
  config, params = convert(hf)
  model = FAMILY.flax_model(config)
  ids = rng.integers(0, VOCAB, size=(3, 16)).astype(np.int64)
  ref_loss, ref_grads = torch_loss_and_grads(hf, ids, ids)

  adapted, p = fa.prepare_for_transfer(model, params, fa.TransferConfig(mode='full'), jnp.asarray(ids))
  emb = ('transformer', 'wte', 'embedding')

  def loss_fn(rest):
    full = {**rest, 'transformer': {**rest['transformer'], 'wte': {'embedding': p['transformer']['wte']['embedding']}}}
    return adapted.apply({'params': full}, jnp.asarray(ids), method='loss')

  rest = {**p, 'transformer': {k: v for k, v in p['transformer'].items() if k != 'wte'}}
  loss, grads = jax.value_and_grad(loss_fn)(rest)
  assert abs(float(loss) - ref_loss) < TOL
  flat = flatten_dict(grads)
  np.testing.assert_allclose(
    np.asarray(flat[('transformer', 'h_0', 'attn', 'c_attn', 'kernel')]),
    ref_grads['transformer.h.0.attn.c_attn.weight'],
    atol=TOL,
    rtol=1e-4,
  )
  np.testing.assert_allclose(
    np.asarray(flat[('transformer', 'wpe', 'embedding')]), ref_grads['transformer.wpe.weight'], atol=TOL, rtol=1e-4
  )
  assert emb not in flat
