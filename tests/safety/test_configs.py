"""Config values are checked by name before anything is built from them; RoPE is read as transformers reads it."""

import json
import math
import time

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conversion import get_family, key_mapping, load_pretrained
from conversion.families import base as family_base
from flax_adapters.models import BertConfig, GPT2Config, LlamaConfig
from flax_adapters.models.llama import inverse_frequencies
from tests.conversion.test_gpt2 import tiny_gpt2
from tests.conversion.test_llama import tiny_llama

SMALL = {
  'gpt2': {'model_type': 'gpt2', 'n_embd': 64, 'n_layer': 2, 'n_head': 4, 'vocab_size': 128},
  'llama': {
    'model_type': 'llama',
    'hidden_size': 64,
    'intermediate_size': 128,
    'num_hidden_layers': 2,
    'num_attention_heads': 4,
    'vocab_size': 128,
    'max_position_embeddings': 64,
  },
  'bert': {
    'model_type': 'bert',
    'hidden_size': 64,
    'intermediate_size': 128,
    'num_hidden_layers': 2,
    'num_attention_heads': 4,
  },
}
LAYERS = {'gpt2': 'n_layer', 'llama': 'num_hidden_layers', 'bert': 'num_hidden_layers'}


@pytest.fixture
def nothing_is_built(monkeypatch):
  """Fail the test if a key table or a shape tree is built."""

  def refuse(*args, **kwargs):
    pytest.fail('a key table or shape tree was built before the config was checked')

  monkeypatch.setattr(key_mapping, 'expand', refuse)
  monkeypatch.setattr(family_base, 'expand', refuse)
  monkeypatch.setattr(family_base, '_param_shapes', refuse)


@pytest.mark.parametrize('family', ['gpt2', 'llama', 'bert'])
@pytest.mark.parametrize('layers', [10**9, 1e5, 100000])
def test_a_huge_layer_count_fails_at_once_naming_the_field(family, layers, tmp_path, nothing_is_built):
  (tmp_path / 'config.json').write_text(json.dumps({**SMALL[family], LAYERS[family]: layers}))
  start = time.process_time()
  found = rf'{LAYERS[family]}(=1000000000 is beyond| must be a positive int, got 100000\.0|=100000 is beyond)'
  with pytest.raises(ValueError, match=rf"config.json': \w+Config\.{found}"):
    load_pretrained(tmp_path)
  assert time.process_time() - start < 1.0  # CPU seconds of this process: only the check ran


@pytest.mark.parametrize(
  'cls, field, value',
  [
    (GPT2Config, 'n_embd', 10**7),
    (GPT2Config, 'vocab_size', 10**10),
    (GPT2Config, 'n_positions', 10**9),
    (LlamaConfig, 'intermediate_size', 10**8),
    (LlamaConfig, 'max_position_embeddings', 10**12),
    (BertConfig, 'num_attention_heads', 10**6),
  ],
)
def test_other_sizes_beyond_any_model(cls, field, value):
  with pytest.raises(ValueError, match=rf'{cls.__name__}\.{field}={value} is beyond any real model'):
    cls(**{field: value})


def test_a_config_deeper_than_its_checkpoint_fails_before_the_table(nothing_is_built):
  hf = tiny_gpt2(n_layer=1)
  config = GPT2Config.from_hf({**hf.config.to_dict(), 'n_layer': 900})
  with pytest.raises(
    ValueError,
    match=r'config n_layer=900, but the gpt2 checkpoint holds layers 0\.\.0 \(1 layers\)\. Fix: set n_layer=1',
  ):
    get_family('gpt2').torch_to_flax(hf.state_dict(), config)


@pytest.mark.parametrize(
  'cls, field, value, message',
  [
    (LlamaConfig, 'rope_theta', -1.0, 'must be a finite number > 0'),
    (LlamaConfig, 'rope_theta', math.inf, 'must be a finite number > 0'),
    (LlamaConfig, 'rms_norm_eps', -1.0, 'must be a finite number > 0'),
    (LlamaConfig, 'rms_norm_eps', math.nan, 'must be a finite number > 0'),
    (GPT2Config, 'layer_norm_epsilon', -1e-5, 'must be a finite number > 0'),
    (BertConfig, 'layer_norm_eps', 0.0, 'must be a finite number > 0'),
    (GPT2Config, 'n_embd', '64', 'must be a positive int'),
    (GPT2Config, 'attn_pdrop', math.nan, r'must be in \[0, 1\)'),
    (GPT2Config, 'tie_word_embeddings', 'yes', 'must be true or false'),
    (BertConfig, 'hidden_act', ['gelu'], 'must be a string'),
  ],
)
def test_values_that_change_the_forward_are_checked_by_name(cls, field, value, message):
  with pytest.raises((ValueError, TypeError), match=rf'{cls.__name__}\.{field} {message}'):
    cls(**{field: value})


L3 = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
SPELLINGS = {
  # transformers 5 lets a non-empty rope_scaling win over rope_parameters (its theta then comes from
  # the top level or the default, not from the discarded rope_parameters).
  'both spellings': dict(
    rope_parameters={'rope_type': 'default', 'rope_theta': 5e5}, rope_scaling={'rope_type': 'llama3', **L3}
  ),
  'both, theta at the top': dict(
    rope_theta=123.0,
    rope_parameters={'rope_type': 'default', 'rope_theta': 5e5},
    rope_scaling={'rope_type': 'linear', 'factor': 2.0},
  ),
  'transformers 4, legacy type key': dict(rope_theta=1000.0, rope_scaling={'type': 'linear', 'factor': 2.0}),
  'transformers 4, no scaling': dict(rope_theta=1000.0, rope_scaling=None),
  'transformers 5, theta at the top': dict(rope_theta=77.0, rope_parameters={'rope_type': 'default'}),
  'transformers 5, theta in both': dict(rope_theta=77.0, rope_parameters={'rope_type': 'default', 'rope_theta': 99.0}),
  'llama3 without original length': dict(
    rope_parameters={'rope_type': 'llama3', **{k: v for k, v in L3.items() if 'original' not in k}}
  ),
  'empty rope_scaling': dict(rope_scaling={}, rope_theta=5.0),
  'rope_parameters with a null rope_scaling': dict(
    rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5, **L3}, rope_scaling=None
  ),
}


@pytest.mark.parametrize('name', list(SPELLINGS))
def test_rope_of_every_spelling_equals_transformers(name):
  hf = {**SMALL['llama'], **SPELLINGS[name]}
  theirs = LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(hf)).inv_freq.numpy()
  np.testing.assert_allclose(inverse_frequencies(LlamaConfig.from_hf(hf)), theirs, rtol=1e-6, atol=0)


def test_a_checkpoint_with_both_rope_spellings_runs_with_the_scaling(tmp_path):
  """End to end: config.json holds rope_parameters (default) and rope_scaling (llama3), as some do."""
  tiny_llama().save_pretrained(tmp_path)
  hf = json.loads((tmp_path / 'config.json').read_text())
  hf['rope_scaling'] = {'rope_type': 'llama3', **L3}
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  assert theirs.config.rope_parameters['rope_type'] == 'llama3'
  model, params, config = load_pretrained(tmp_path)
  assert config.rope_type == 'llama3'
  ids = np.arange(40).reshape(2, 20) % 128
  with torch.no_grad():
    expected = theirs(torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({'params': params}, ids)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  'rope, error, message',
  [
    ({'rope_type': 'linear', 'factor': math.nan}, ValueError, r'LlamaConfig\.rope_factor must be a finite number > 0'),
    ({'rope_type': 'linear', 'factor': -2.0}, ValueError, r'LlamaConfig\.rope_factor must be a finite number > 0'),
    (
      {'rope_type': 'llama3', **L3, 'high_freq_factor': 1.0},
      ValueError,
      r'rope_high_freq_factor=1\.0 must be greater than',
    ),
    ({'rope_type': 'default', 'rope_theta': -1}, ValueError, r'LlamaConfig\.rope_theta must be a finite number > 0'),
    ({'rope_type': 'yarn', 'factor': 2.0}, ValueError, r"rope_type='yarn' is not implemented"),
    (
      {'rope_type': 'default', 'partial_rotary_factor': 0.5},
      ValueError,
      r'partial_rotary_factor=0\.5 is not supported',
    ),
    (
      {'full_attention': {'rope_type': 'default'}},
      ValueError,
      r"RoPE parameters per layer type \(\['full_attention'\]\)",
    ),
    ('llama3', TypeError, r"config rope_scaling='llama3' must be an object of RoPE parameters"),
  ],
)
def test_bad_rope_parameters_are_refused_by_name(rope, error, message):
  with pytest.raises(error, match=message):
    LlamaConfig.from_hf({**SMALL['llama'], 'rope_scaling': rope})
