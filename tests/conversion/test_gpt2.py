"""Tiny random GPT2LMHeadModel: torch -> flax -> torch, logits equal to 1e-4 (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conversion import get_family, load_pretrained, save_pretrained
from flax_adapters.models.layers import dot_product_attention

TOL = 1e-4
VOCAB = 128
FAMILY = get_family('gpt2')


def tiny_gpt2(**overrides):
  torch.manual_seed(0)
  config = dict(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **overrides})).eval()
  with torch.no_grad():  # HF initialises LayerNorms to 1/0 and biases to 0; make them matter.
    for name, p in model.named_parameters():
      if 'ln_' in name or name.endswith('.bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def torch_logits(model, ids, mask=None):
  with torch.no_grad():
    kwargs = {} if mask is None else {'attention_mask': torch.from_numpy(mask)}
    return model(torch.from_numpy(ids), **kwargs).logits.numpy()


def convert(hf):
  config = FAMILY.config_from_hf(hf.config.to_dict())
  return config, FAMILY.torch_to_flax(hf.state_dict(), config)


@pytest.fixture
def ids(rng):
  return rng.integers(0, VOCAB, size=(2, 16)).astype(np.int64)


@pytest.mark.parametrize(
  'overrides',
  [
    {},
    {'tie_word_embeddings': False, 'n_inner': 96, 'activation_function': 'gelu'},
    {'scale_attn_by_inverse_layer_idx': True, 'reorder_and_upcast_attn': True},
  ],
  ids=['tied', 'untied_n_inner_gelu', 'inverse_layer_idx_upcast'],
)
def test_logits_match_and_export_loads_strictly(overrides, ids):
  hf = tiny_gpt2(**overrides)
  config, params = convert(hf)
  # The exported config.json describes the same model (reorder_and_upcast_attn and token ids were dropped).
  back = transformers.GPT2Config(**{k: v for k, v in config.to_hf().items() if k != 'model_type'})
  for key in ('n_inner', 'activation_function', 'scale_attn_by_inverse_layer_idx', 'reorder_and_upcast_attn'):
    assert getattr(back, key) == getattr(hf.config, key), key
  assert (back.bos_token_id, back.eos_token_id) == (hf.config.bos_token_id, hf.config.eos_token_id)
  assert ('lm_head' in params) == (not config.tie_word_embeddings)
  expected = torch_logits(hf, ids)
  ours = jax.jit(FAMILY.flax_model(config).apply)({'params': params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)

  exported = FAMILY.flax_to_torch(params, config)
  assert 'lm_head.weight' in exported  # tied or not: torch's state_dict lists it
  fresh = transformers.GPT2LMHeadModel(hf.config).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  np.testing.assert_allclose(torch_logits(fresh, ids), expected, atol=TOL, rtol=0)


def test_fused_c_attn_keeps_torch_layout():
  hf = tiny_gpt2()
  _, params = convert(hf)
  kernel = params['transformer']['h_0']['attn']['c_attn']['kernel']
  assert kernel.shape == (64, 192)  # one Dense for q, k and v, like Conv1D's [in, 3 * out]
  np.testing.assert_array_equal(np.asarray(kernel), hf.transformer.h[0].attn.c_attn.weight.detach().numpy())


def test_legacy_gpt2model_checkpoint_layout(ids):
  """The hub's `gpt2` checkpoint: GPT2Model keys without `transformer.`, plus causal-mask buffers."""
  hf = tiny_gpt2()
  legacy = {k.removeprefix('transformer.'): v for k, v in hf.state_dict().items() if k != 'lm_head.weight'}
  for i in range(2):
    legacy[f'h.{i}.attn.bias'] = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
    legacy[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
  config = FAMILY.config_from_hf(hf.config.to_dict())
  params = FAMILY.torch_to_flax(legacy, config)
  ours = jax.jit(FAMILY.flax_model(config).apply)({'params': params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), torch_logits(hf, ids), atol=TOL, rtol=0)


def test_right_padding_matches_on_real_tokens(ids):
  hf = tiny_gpt2()
  config, params = convert(hf)
  mask = np.ones_like(ids)
  mask[0, 10:] = 0
  apply = jax.jit(FAMILY.flax_model(config).apply)
  ours = np.asarray(apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], torch_logits(hf, ids, mask)[real], atol=TOL, rtol=0)


def test_dropout_only_when_not_deterministic(ids):
  hf = tiny_gpt2()
  config, params = convert(hf)
  apply = jax.jit(FAMILY.flax_model(config).apply, static_argnames='deterministic')
  variables = {'params': params}
  clean = apply(variables, jnp.asarray(ids))
  noisy = lambda seed: apply(variables, jnp.asarray(ids), deterministic=False, rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(noisy(0), clean, atol=1e-3)
  np.testing.assert_array_equal(noisy(0), noisy(0))
  assert not np.allclose(noisy(0), noisy(1), atol=1e-3)
  # With every rate 0, training mode is exact.
  no_dropout = FAMILY.config_from_hf(hf.config.to_dict(), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  train = jax.jit(FAMILY.flax_model(no_dropout).apply, static_argnames='deterministic')(
    variables, jnp.asarray(ids), deterministic=False
  )
  np.testing.assert_allclose(train, clean, atol=1e-6)


def test_attention_dropout_path_equals_fused_path_at_vanishing_rate():
  # The written-out path (used only for attention dropout) must compute the same attention.
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32) for _ in range(2))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)[:, None, None, :]
  fused = jax.jit(lambda: dot_product_attention(q, k, v, scale=8**-0.5, mask=mask, is_causal=True))()
  written = jax.jit(
    lambda: dot_product_attention(
      q, k, v, scale=8**-0.5, mask=mask, is_causal=True, dropout_rate=1e-9, dropout_rng=jax.random.key(1)
    )
  )()
  np.testing.assert_allclose(written, fused, atol=1e-5)


def test_sharded_hf_checkpoint_loads(tmp_path, ids):
  hf = tiny_gpt2()
  hf.save_pretrained(tmp_path, max_shard_size='50KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  model, params, config = load_pretrained(tmp_path)
  assert config.n_layer == 2 and config.tie_word_embeddings
  np.testing.assert_allclose(
    np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(ids))), torch_logits(hf, ids), atol=TOL, rtol=0
  )


def test_save_pretrained_bfloat16_is_read_by_transformers(tmp_path, ids):
  hf = tiny_gpt2()
  config, params = convert(hf)
  save_pretrained(tmp_path, params, config, dtype='bfloat16')
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
  weight = reloaded.transformer.h[1].mlp.c_fc.weight.detach()
  np.testing.assert_array_equal(weight.numpy(), hf.transformer.h[1].mlp.c_fc.weight.detach().bfloat16().float().numpy())
  # bfloat16 weights (8 mantissa bits) move the tiny model's O(1) logits by well under 0.1.
  np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf, ids), atol=0.1)
