"""HF configurations beyond the families' defaults: tiny random models saved by transformers, converted by
`load_pretrained`, compared with torch in float32 (with padding and explicit position ids), and exported
back through `save_pretrained` into `from_pretrained`.

Tolerance: `REL` is the largest absolute difference relative to the largest absolute torch value (float32
runs of 1-2 layer models differ by ~3e-7 here).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conversion import get_family, load_pretrained, save_pretrained
from flax_adapters.models.llama import inverse_frequencies

REL = 1e-5
VOCAB = 96
LENGTH = 10
REAL = 7  # the second row is padded after its first REAL tokens


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def on_real_tokens(x):
  """Row 0 whole, row 1 up to its padding (outputs at padded positions are unspecified)."""
  return np.concatenate([x[0], x[1, :REAL]])


def make_inputs(rng):
  ids = rng.integers(0, VOCAB, size=(2, LENGTH))
  mask = np.ones((2, LENGTH), np.int64)
  mask[1, REAL:] = 0
  positions = np.stack([np.arange(LENGTH) + 3, np.arange(LENGTH)])  # row 0 shifted, as after a prefix
  return ids, mask, positions


def randomized(model):
  """HF initialises norms to 1 and biases to 0; perturb them so that a dropped one would show."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or name.endswith('.bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def torch_outputs(model, ids, mask, positions, **kwargs):
  with torch.no_grad():
    return model(
      torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions), **kwargs
    )


# ---- LLaMA ---------------------------------------------------------------------------------------

LLAMA = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'rope_theta': 1e4}


def _matches_torch_and_exports(hf, tmp_path, rng):
  """A causal LM converted from `hf` gives its logits; exported back, transformers loads the same model."""
  hf.save_pretrained(tmp_path / 'hf')
  model, params, config = load_pretrained(tmp_path / 'hf')
  ids, mask, positions = make_inputs(rng)
  expected = torch_outputs(hf, ids, mask, positions).logits.numpy()
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
  assert relative_error(on_real_tokens(ours), on_real_tokens(expected)) < REL

  save_pretrained(tmp_path / 'out', params, config)
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').eval()
  reloaded = torch_outputs(again, ids, mask, positions).logits.numpy()
  assert relative_error(on_real_tokens(reloaded), on_real_tokens(expected)) < REL


@pytest.mark.parametrize(
  'overrides',
  [
    {'num_key_value_heads': 1, 'head_dim': 16, 'rms_norm_eps': 1e-2},
    {'attention_bias': True, 'mlp_bias': True, 'tie_word_embeddings': True},
    {'hidden_act': 'gelu_pytorch_tanh', 'rope_parameters': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 500.0}},
    {'rope_parameters': {**LLAMA3_ROPE, 'original_max_position_embeddings': 16}},
    {'rope_scaling': {'type': 'linear', 'factor': 2.0}},  # the transformers 4 spelling
  ],
  ids=['mqa_head_dim_eps', 'biases_tied', 'linear_rope_gelu', 'llama3_rope', 'legacy_rope_scaling'],
)
def test_llama_variant_matches_torch_and_exports(overrides, tmp_path, rng):
  torch.manual_seed(0)
  hf = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})))
  _matches_torch_and_exports(hf, tmp_path, rng)


@pytest.mark.parametrize(
  'head_dim, rope',
  [
    (128, {'rope_type': 'default', 'rope_theta': 1e4}),  # Llama 2
    (128, {**LLAMA3_ROPE, 'rope_theta': 5e5, 'original_max_position_embeddings': 8192}),  # Llama 3.1
    (64, {'rope_type': 'default', 'rope_theta': 5e5}),  # Llama 3.2 1B's head_dim
    (128, {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 1e4}),
  ],
  ids=['llama2', 'llama3.1', 'head_dim64', 'linear'],
)
def test_inverse_frequencies_equal_transformers_bitwise(head_dim, rope):
  # One ulp in an inverse frequency is an angle error of position·ulp: 2e-4 in cos/sin at position 4096.
  hf_config = transformers.LlamaConfig(
    hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=131072, rope_parameters=dict(rope)
  )
  ours = inverse_frequencies(get_family('llama').config_from_hf(hf_config.to_dict()))
  np.testing.assert_array_equal(ours, LlamaRotaryEmbedding(hf_config).inv_freq.numpy())


def test_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path, rng):
  # transformers 5 gives a top-level original_max_position_embeddings priority over the llama3 dict's.
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(**LLAMA, rope_parameters={**LLAMA3_ROPE, 'original_max_position_embeddings': 16})
  )
  hf.save_pretrained(tmp_path)
  with open(tmp_path / 'config.json') as f:
    hf_json = json.load(f)
  hf_json['rope_parameters'].pop('original_max_position_embeddings')
  hf_json['original_max_position_embeddings'] = 8
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hf_json, f)
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert reference.config.rope_parameters['original_max_position_embeddings'] == 8

  model, params, config = load_pretrained(tmp_path)
  assert config.rope_original_max_position_embeddings == 8
  ids, mask, _ = make_inputs(rng)
  positions = np.stack([np.arange(LENGTH) * 5] * 2)  # long wavelengths matter only far apart
  expected = torch_outputs(reference, ids, mask, positions).logits.numpy()
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
  assert relative_error(on_real_tokens(ours), on_real_tokens(expected)) < REL


@pytest.mark.parametrize(
  'rope',
  [
    {'rope_type': 'dynamic', 'factor': 2.0},
    {'rope_type': 'yarn', 'factor': 2.0},
    {'type': 'dynamic', 'factor': 2.0},
    {'rope_type': 'longrope', 'short_factor': [1.0] * 4, 'long_factor': [1.0] * 4},
  ],
  ids=['dynamic', 'yarn', 'legacy_dynamic', 'longrope'],
)
def test_unimplemented_rope_types_are_refused_by_name(rope):
  with pytest.raises(ValueError, match=f'rope_type={rope.get("rope_type", rope.get("type"))!r} is not implemented'):
    get_family('llama').config_from_hf({'model_type': 'llama', **LLAMA, 'rope_scaling': rope})


def test_missing_rope_parameter_names_the_config_json_key():
  rope = {'rope_type': 'llama3', 'factor': 8.0, 'high_freq_factor': 4.0}
  with pytest.raises(ValueError, match="'low_freq_factor' in its rope_parameters"):
    get_family('llama').config_from_hf({'model_type': 'llama', **LLAMA, 'rope_scaling': rope})


@pytest.mark.parametrize('torch_dtype', [torch.float16, torch.bfloat16])
def test_sharded_half_precision_checkpoint_loads(torch_dtype, tmp_path, rng):
  torch.manual_seed(0)
  hf = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)))
  hf.to(torch_dtype).save_pretrained(tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  model, params, _ = load_pretrained(tmp_path)  # float32 params: the half-precision values, exactly
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  ids, mask, positions = make_inputs(rng)
  expected = torch_outputs(reference, ids, mask, positions).logits.numpy()
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
  assert relative_error(on_real_tokens(ours), on_real_tokens(expected)) < REL


def test_save_pretrained_keeps_bfloat16_params_bfloat16(tmp_path):
  torch.manual_seed(0)
  hf = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))).to(torch.bfloat16)
  hf.save_pretrained(tmp_path / 'hf')
  _, params, config = load_pretrained(tmp_path / 'hf', param_dtype=jnp.bfloat16)
  save_pretrained(tmp_path / 'out', params, config)  # dtype=None: keep the params'

  with safe_open(os.fspath(tmp_path / 'out' / 'model.safetensors'), framework='pt') as f:
    dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
  assert dtypes == {torch.bfloat16}
  with open(tmp_path / 'out' / 'config.json') as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out')
  assert again.dtype == torch.bfloat16
  for name, tensor in hf.state_dict().items():
    assert torch.equal(again.state_dict()[name], tensor), name


# ---- GPT-2 ---------------------------------------------------------------------------------------

GPT2 = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)


@pytest.mark.parametrize(
  'overrides',
  [
    {'n_inner': 40, 'activation_function': 'relu', 'layer_norm_epsilon': 1e-2},
    {'scale_attn_by_inverse_layer_idx': True, 'reorder_and_upcast_attn': True, 'activation_function': 'gelu_fast'},
    {'scale_attn_weights': False, 'tie_word_embeddings': False, 'activation_function': 'gelu'},
  ],
  ids=['n_inner_relu_eps', 'inverse_layer_idx_reorder', 'unscaled_untied'],
)
def test_gpt2_variant_matches_torch_and_exports(overrides, tmp_path, rng):
  torch.manual_seed(0)
  hf = randomized(transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **overrides})))
  _matches_torch_and_exports(hf, tmp_path, rng)


# ---- BERT ----------------------------------------------------------------------------------------

BERT = dict(
  vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
  max_position_embeddings=32,
)  # fmt: skip


@pytest.mark.parametrize(
  'cls, overrides, load_kwargs',
  [
    ('BertModel', {'type_vocab_size': 3, 'hidden_act': 'relu', 'layer_norm_eps': 1e-3}, {}),
    ('BertForSequenceClassification', {'hidden_act': 'gelu_new'}, {'ignore': (r'classifier\..*',)}),
    ('BertForMaskedLM', {}, {'ignore': (r'cls\..*',), 'add_pooling_layer': False}),
  ],
  ids=['type_vocab3_relu_eps', 'sequence_classification', 'masked_lm'],
)
def test_bert_variant_matches_torch_and_exports(cls, overrides, load_kwargs, tmp_path, rng):
  torch.manual_seed(0)
  hf = randomized(getattr(transformers, cls)(transformers.BertConfig(**{**BERT, **overrides})))
  hf.save_pretrained(tmp_path / 'hf')
  model, params, config = load_pretrained(tmp_path / 'hf', **load_kwargs)
  ids, mask, positions = make_inputs(rng)
  token_types = rng.integers(0, config.type_vocab_size, size=ids.shape)
  trunk = hf if cls == 'BertModel' else hf.bert
  expected = torch_outputs(trunk, ids, mask, positions, token_type_ids=torch.from_numpy(token_types))
  out = model.apply(
    {'params': params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types), jnp.asarray(positions)
  )
  hidden = expected.last_hidden_state.numpy()
  assert relative_error(on_real_tokens(out.last_hidden_state), on_real_tokens(hidden)) < REL
  assert (out.pooler_output is None) == (expected.pooler_output is None)
  if out.pooler_output is not None:
    assert relative_error(out.pooler_output, expected.pooler_output.numpy()) < REL

  save_pretrained(tmp_path / 'out', params, config)
  again = transformers.BertModel.from_pretrained(tmp_path / 'out', add_pooling_layer=config.add_pooling_layer).eval()
  reloaded = torch_outputs(again, ids, mask, positions, token_type_ids=torch.from_numpy(token_types))
  assert relative_error(on_real_tokens(reloaded.last_hidden_state.numpy()), on_real_tokens(hidden)) < REL


@pytest.mark.parametrize('family', ['bert', 'gpt2'])
def test_pruned_heads_are_refused(family):
  # transformers 4's prune_heads: narrower q/k/v than the config's sizes, which transformers 5 cannot build.
  with pytest.raises(ValueError, match=r"pruned_heads=\{'0': \[1\]\} is not supported.*unpruned"):
    get_family(family).config_from_hf({'model_type': family, 'pruned_heads': {'0': [1]}})
  get_family(family).config_from_hf({'model_type': family, 'pruned_heads': {}})  # nothing pruned: fine
