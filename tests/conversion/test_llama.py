"""Tiny random LlamaForCausalLM: torch -> flax -> torch, logits equal to 1e-4 (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

from conversion import get_family, load_pretrained, save_pretrained
from flax_adapters.models.llama import LlamaConfig, inverse_frequencies

TOL = 1e-4
VOCAB = 128
FAMILY = get_family('llama')


def tiny_llama(**overrides):
  """Grouped-query attention: 4 query heads share 2 key/value heads."""
  torch.manual_seed(0)
  config = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()
  with torch.no_grad():  # HF initialises norms to 1 and biases to 0; make them matter.
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or name.endswith('.bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def torch_logits(model, ids, mask=None):
  with torch.no_grad():
    kwargs = {} if mask is None else {'attention_mask': torch.from_numpy(mask)}
    return model(torch.from_numpy(ids), **kwargs).logits.float().numpy()


def flax_logits(config, params, ids, mask=None, **model_kwargs):
  model = FAMILY.flax_model(config, **model_kwargs)
  args = (jnp.asarray(ids),) if mask is None else (jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(jax.jit(model.apply)({'params': params}, *args), dtype=np.float32)


@pytest.fixture
def ids(rng):
  return rng.integers(0, VOCAB, size=(2, 12)).astype(np.int64)


@pytest.mark.parametrize(
  'overrides',
  [
    {},
    {'attention_bias': True},
    {'mlp_bias': True, 'tie_word_embeddings': True},
    {'num_key_value_heads': 1, 'head_dim': 32},  # multi-query, head_dim != hidden/heads
  ],
  ids=['gqa', 'attention_bias', 'mlp_bias_tied', 'mqa_head_dim'],
)
def test_logits_match_and_export_loads_strictly(overrides, ids):
  hf = tiny_llama(**overrides)
  config = FAMILY.config_from_hf(hf.config.to_dict())
  for key, value in overrides.items():
    assert getattr(config, key) == value
  params = FAMILY.torch_to_flax(hf.state_dict(), config)
  expected = torch_logits(hf, ids)
  np.testing.assert_allclose(flax_logits(config, params, ids), expected, atol=TOL, rtol=0)

  exported = FAMILY.flax_to_torch(params, config)
  fresh = transformers.LlamaForCausalLM(hf.config).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  np.testing.assert_allclose(torch_logits(fresh, ids), expected, atol=TOL, rtol=0)


def test_flax_paths_mirror_torch_module_paths():
  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  paths = {'/'.join(p) for p in FAMILY.param_shapes(config)}
  assert 'model/layers_0/self_attn/q_proj/kernel' in paths
  assert 'model/layers_1/mlp/gate_proj/kernel' in paths
  assert 'lm_head/kernel' in paths and 'model/norm/scale' in paths
  assert FAMILY.param_shapes(config)[('model', 'layers_0', 'self_attn', 'k_proj', 'kernel')].shape == (64, 32)


def test_right_padding_matches_on_real_tokens(ids):
  hf = tiny_llama()
  config = FAMILY.config_from_hf(hf.config.to_dict())
  params = FAMILY.torch_to_flax(hf.state_dict(), config)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  ours, theirs = flax_logits(config, params, ids, mask), torch_logits(hf, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def test_llama3_rope_scaling_matches(ids):
  rope = {
    'rope_type': 'llama3',
    'rope_theta': 500000.0,
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 16,
  }
  hf = tiny_llama(rope_parameters=rope)
  config = FAMILY.config_from_hf(hf.config.to_dict())
  assert config.rope_type == 'llama3'
  np.testing.assert_allclose(inverse_frequencies(config), hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  params = FAMILY.torch_to_flax(hf.state_dict(), config)
  np.testing.assert_allclose(flax_logits(config, params, ids), torch_logits(hf, ids), atol=TOL, rtol=0)


def test_transformers4_rope_spelling_is_read():
  config = LlamaConfig.from_hf(
    {
      'model_type': 'llama',
      'hidden_size': 64,
      'num_attention_heads': 4,
      'rope_theta': 1234.0,
      'rope_scaling': {'type': 'linear', 'factor': 2.0},
    }
  )
  assert (config.rope_theta, config.rope_type, config.rope_factor) == (1234.0, 'linear', 2.0)


@pytest.mark.parametrize(
  'rope',
  [
    {},
    {'rope_type': 'linear', 'rope_factor': 2.0, 'rope_theta': 20000.0},
    {'rope_type': 'llama3', 'rope_factor': 8.0, 'rope_low_freq_factor': 1.0, 'rope_high_freq_factor': 4.0},
  ],
  ids=['default', 'linear', 'llama3'],
)
def test_to_hf_writes_rope_in_both_transformers_spellings(rope):
  """Each spelling alone reads back as the same config: transformers 5's `rope_parameters`, and
  transformers 4's top-level `rope_theta` + `rope_scaling` (null for the default type); and
  transformers 5 builds the same RoPE from the whole dict."""
  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    bos_token_id=1,  # transformers' LLaMA defaults, which its config dict then holds
    eos_token_id=2,
    **rope,
  )
  d = config.to_hf()
  v5 = {k: v for k, v in d.items() if k not in ('rope_theta', 'rope_scaling')}
  v4 = {k: v for k, v in d.items() if k != 'rope_parameters'}
  assert LlamaConfig.from_hf(v5) == config and LlamaConfig.from_hf(v4) == config
  assert (d['rope_scaling'] is None) == (config.rope_type == 'default') and 'rope_theta' not in (
    d['rope_scaling'] or {}
  )
  hf = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != 'model_type'})
  assert LlamaConfig.from_hf(hf.to_dict()) == config
  inv_freq = transformers.LlamaForCausalLM(hf).model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(inverse_frequencies(config), inv_freq, rtol=1e-6)


def test_unimplemented_rope_type_is_refused():
  with pytest.raises(
    ValueError, match=r"rope_type='yarn' is not implemented; supported: \('default', 'linear', 'llama3'\)"
  ):
    LlamaConfig.from_hf({'model_type': 'llama', 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}})


def test_bf16_checkpoint_converts_through_float32(tmp_path, ids):
  hf = tiny_llama().to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  with safetensors.safe_open(tmp_path / 'model.safetensors', 'pt') as f:
    assert f.get_tensor('model.layers.0.self_attn.q_proj.weight').dtype == torch.bfloat16
  reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

  model, params, config = load_pretrained(tmp_path)
  kernel = params['model']['layers_0']['self_attn']['q_proj']['kernel']
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
    np.asarray(kernel), hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
  )
  logits = np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(ids)))
  np.testing.assert_allclose(logits, torch_logits(reference, ids), atol=TOL, rtol=0)

  _, bf16_params, _ = load_pretrained(tmp_path, param_dtype=jnp.bfloat16)
  kernel16 = bf16_params['model']['layers_0']['self_attn']['q_proj']['kernel']
  assert kernel16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kernel16, np.float32), np.asarray(kernel))


def test_bf16_compute_stays_close_to_float32(ids):
  hf = tiny_llama()
  config = FAMILY.config_from_hf(hf.config.to_dict())
  params = FAMILY.torch_to_flax(hf.state_dict(), config, param_dtype=jnp.bfloat16)
  model = FAMILY.flax_model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)({'params': params}, jnp.asarray(ids))
  assert logits.dtype == jnp.bfloat16
  # bfloat16 has 8 mantissa bits; the tiny model's logits are O(1).
  np.testing.assert_allclose(np.asarray(logits, np.float32), torch_logits(hf, ids), atol=0.1)


def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, ids):
  hf = tiny_llama(attention_bias=True)
  config = FAMILY.config_from_hf(hf.config.to_dict())
  params = FAMILY.torch_to_flax(hf.state_dict(), config)
  save_pretrained(tmp_path, params, config)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(reloaded).__name__ == 'LlamaForCausalLM'
  np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(hf, ids), atol=TOL, rtol=0)


def test_rmsnorm_is_a_norm_so_unfreeze_norm_trains_it():
  import flax_adapters as fa  # pylint: disable=g-import-not-at-top

  config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  model = FAMILY.flax_model(config)
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert fa.trace_model(model, ids).sites[('model', 'norm')].kind == 'norm'
  adapted, p = fa.prepare_for_transfer(
    model, params, fa.TransferConfig(mode='lora', lora_targets=['q_proj'], lora_rank=2, unfreeze_norm=True), ids
  )
  mask = fa.trainable_mask(adapted, p)
  assert mask['model']['norm']['scale'] and mask['model']['layers_0']['input_layernorm']['scale']
  assert not mask['model']['layers_0']['self_attn']['q_proj']['kernel']


@pytest.mark.parametrize('eos', [257, [257, 259]], ids=['eos', 'eos_list'])
def test_special_token_ids_ride_along_to_the_export(tmp_path, eos):
  """bos/eos/pad are read from config.json and written back (generation reads them; they were dropped,
  so transformers fell back to LLaMA's bos 1 / eos 2); eos may be a list (Llama 3)."""
  hf = tiny_llama(vocab_size=260, bos_token_id=256, eos_token_id=eos, pad_token_id=258)
  config = FAMILY.config_from_hf(hf.config.to_dict())
  assert (config.bos_token_id, config.pad_token_id) == (256, 258) and hash(config)
  save_pretrained(tmp_path / 'out', FAMILY.torch_to_flax(hf.state_dict(), config), config)
  back = transformers.AutoConfig.from_pretrained(tmp_path / 'out')
  assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (256, eos, 258)
  assert LlamaConfig().to_hf().keys().isdisjoint({'bos_token_id', 'eos_token_id', 'pad_token_id'})  # class defaults
  with pytest.raises(TypeError, match=r'LlamaConfig.eos_token_id must be a token id \(an int >= 0\), a list'):
    LlamaConfig(eos_token_id='</s>')
