"""Malformed inputs fail with errors that name the key, both shapes and a fix."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conversion import get_family, load_state_dict
from flax_adapters.models.bert import BertConfig
from flax_adapters.models.gpt2 import GPT2Config

LLAMA = get_family('llama')
GPT2 = get_family('gpt2')
BERT = get_family('bert')


@pytest.fixture(scope='module')
def llama():
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=64,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      bos_token_id=1,
      eos_token_id=2,
    )
  )
  return LLAMA.config_from_hf(hf.config.to_dict()), hf.state_dict()


def test_wrong_shape_names_key_shapes_and_fix(llama):
  config, state_dict = llama
  bad = dict(state_dict)
  bad['model.layers.1.self_attn.k_proj.weight'] = torch.zeros(32, 32)
  with pytest.raises(
    ValueError,
    match=(
      r"wrong shape: state_dict\['model\.layers\.1\.self_attn\.k_proj\.weight'\] has shape \(32, 32\), "
      r'\(32, 32\) once transposed to flax layout, but flax model/layers_1/self_attn/k_proj/kernel '
      r'expects \(32, 16\)\. Fix: the config does not match the checkpoint; check .*num_key_value_heads=2'
    ),
  ):
    LLAMA.torch_to_flax(bad, config)


def test_missing_key(llama):
  config, state_dict = llama
  bad = {k: v for k, v in state_dict.items() if k != 'model.layers.0.mlp.up_proj.weight'}
  with pytest.raises(
    ValueError,
    match=(
      r"missing key: 'model\.layers\.0\.mlp\.up_proj\.weight' \(for flax "
      r'model/layers_0/mlp/up_proj/kernel, shape \(32, 64\)\) is not in the checkpoint'
    ),
  ):
    LLAMA.torch_to_flax(bad, config)


def test_unexpected_key_suggests_ignore(llama):
  config, state_dict = llama
  bad = {**state_dict, 'model.layers.0.self_attn.rope_gate': torch.zeros(3)}
  with pytest.raises(
    ValueError,
    match=(
      r"unexpected key: 'model\.layers\.0\.self_attn\.rope_gate' \(shape \(3,\)\) has no place in "
      r"LlamaForCausalLM\. Fix: .*ignore=\['model\\\\\.layers\\\\\.0\\\\\.self_attn\\\\\.rope_gate'\]"
    ),
  ):
    LLAMA.torch_to_flax(bad, config)
  # ...and passing that regex accepts the checkpoint on purpose.
  LLAMA.torch_to_flax(bad, config, ignore=[r'model\.layers\.0\.self_attn\.rope_gate'])


def test_bias_keys_with_attention_bias_false_point_at_the_flag(llama):
  config, state_dict = llama
  bad = {**state_dict, 'model.layers.0.self_attn.q_proj.bias': torch.zeros(32)}
  with pytest.raises(
    ValueError, match=r'the config has attention_bias=False, so the model has no such parameter; flip it'
  ):
    LLAMA.torch_to_flax(bad, config)


def test_extra_layers_point_at_the_depth(llama):
  config, state_dict = llama
  shallow = LLAMA.config_from_hf({**LLAMA.config_class.to_hf(config), 'num_hidden_layers': 1})
  with pytest.raises(ValueError, match=r'the checkpoint has layer 1 but config\.num_hidden_layers=1'):
    LLAMA.torch_to_flax(state_dict, shallow)


def test_all_problems_are_listed_together(llama):
  config, state_dict = llama
  bad = dict(state_dict)
  del bad['model.norm.weight']
  bad['model.embed_tokens.weight'] = torch.zeros(65, 32)
  bad['stray'] = torch.zeros(1)
  with pytest.raises(ValueError) as info:
    LLAMA.torch_to_flax(bad, config)
  message = str(info.value)
  assert 'missing key' in message and 'wrong shape' in message and 'unexpected key' in message


def test_untied_checkpoint_with_tied_config_is_refused(llama):
  config, state_dict = llama
  tied = LLAMA.config_from_hf(LLAMA.config_class.to_hf(config), tie_word_embeddings=True)
  with pytest.raises(
    ValueError, match=r"'lm_head\.weight' differs from 'model\.embed_tokens\.weight'.*set tie_word_embeddings=False"
  ):
    LLAMA.torch_to_flax(state_dict, tied)


def test_headless_checkpoint_says_it_has_no_lm_head(llama):
  """A trunk or task checkpoint lacks the head: say so first (tying was the only fix offered, and it made
  the embedding the head of an untied model without a word)."""
  config, state_dict = llama
  headless = {k: v for k, v in state_dict.items() if k != 'lm_head.weight'}
  with pytest.raises(
    ValueError,
    match=r"missing key: 'lm_head\.weight'.*the checkpoint has no LM head: it is a bare trunk or a task model.*"
    r'load a LlamaForCausalLM checkpoint\. Set tie_word_embeddings=True only if the model it came from ties',
  ):
    LLAMA.torch_to_flax(headless, config)


@pytest.mark.parametrize('theirs', ['gpt2', 'bert'])
def test_checkpoint_of_another_family_names_the_family_its_keys_fit(llama, theirs):
  """Keys of another architecture were reported as a checkpoint with 0 layers, with the fix
  'set num_hidden_layers=0' (which the config refuses)."""
  config, _ = llama
  if theirs == 'gpt2':
    other = transformers.GPT2LMHeadModel(
      transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    )
  else:
    other = transformers.BertModel(
      transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
      )
    )
  with pytest.raises(
    ValueError,
    match=rf"not a llama \(LlamaForCausalLM\) checkpoint: none of its \d+ keys .* Fix: its keys are those of a '{theirs}' model",
  ):
    LLAMA.torch_to_flax(other.state_dict(), config)


def test_saved_inv_freq_must_match_rope_theta(llama):
  config, state_dict = llama
  wrong = 1.0 / (500000.0 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
  bad = {**state_dict, 'model.rotary_emb.inv_freq': torch.from_numpy(wrong)}
  with pytest.raises(
    ValueError, match=r"state_dict\['model\.rotary_emb\.inv_freq'\] .* does not match the config \(rope_theta=10000\.0"
  ):
    LLAMA.torch_to_flax(bad, config)


def test_config_of_another_family_is_a_type_error(llama):
  _, state_dict = llama
  with pytest.raises(TypeError, match=r"config must be a LlamaConfig for the 'llama' family, got GPT2Config"):
    LLAMA.torch_to_flax(state_dict, GPT2Config())


def test_integer_tensor_where_a_weight_belongs(llama):
  config, state_dict = llama
  bad = {**state_dict, 'model.norm.weight': torch.ones(32, dtype=torch.int8)}
  with pytest.raises(TypeError, match=r"state_dict\['model\.norm\.weight'\] has dtype int8"):
    LLAMA.torch_to_flax(bad, config)


def test_export_refuses_unmerged_adapter_params(llama):
  config, state_dict = llama
  params = LLAMA.torch_to_flax(state_dict, config)
  params['model']['layers_0']['self_attn']['q_proj']['lora_a'] = jnp.zeros((32, 4))
  with pytest.raises(
    ValueError, match=r'unexpected path: params/model/layers_0/self_attn/q_proj/lora_a .* merge adapter weights'
  ):
    LLAMA.flax_to_torch(params, config)


def test_export_wrong_shape(llama):
  config, state_dict = llama
  params = LLAMA.torch_to_flax(state_dict, config)
  params['model']['norm']['scale'] = jnp.ones(31)
  with pytest.raises(
    ValueError,
    match=r'wrong shape: params/model/norm/scale has shape \(31,\), but LlamaForCausalLM with this config expects \(32,\)',
  ):
    LLAMA.flax_to_torch(params, config)


def test_bert_task_checkpoint_heads_must_be_ignored_explicitly():
  torch.manual_seed(0)
  hf = transformers.BertForSequenceClassification(
    transformers.BertConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
  )
  config = BERT.config_from_hf(hf.config.to_dict())
  with pytest.raises(ValueError, match=r"unexpected key: 'classifier\.weight' \(shape \(2, 32\)\)"):
    BERT.torch_to_flax(hf.state_dict(), config)
  params = BERT.torch_to_flax(hf.state_dict(), config, ignore=[r'classifier\..*'])  # `bert.` stripped
  np.testing.assert_array_equal(
    np.asarray(params['pooler']['dense']['bias']), hf.bert.pooler.dense.bias.detach().numpy()
  )


def test_bert_without_pooler_says_how_to_drop_it():
  hf = transformers.BertModel(
    transformers.BertConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    ),
    add_pooling_layer=False,
  )
  config = BERT.config_from_hf(hf.config.to_dict())
  with pytest.raises(
    ValueError, match=r"missing key: 'pooler\.dense\.weight'.*this key exists because config\.add_pooling_layer=True"
  ):
    BERT.torch_to_flax(hf.state_dict(), config)
  assert 'pooler' not in BERT.torch_to_flax(
    hf.state_dict(), BertConfig.from_hf(hf.config.to_dict(), add_pooling_layer=False)
  )


def test_config_errors():
  with pytest.raises(ValueError, match=r"config model_type is 'bert', but GPT2Config reads 'gpt2' configs"):
    GPT2Config.from_hf({'model_type': 'bert'})
  with pytest.raises(ValueError, match=r'GPT2Config\.n_embd=10 must be divisible by n_head=4'):
    GPT2Config(n_embd=10, n_head=4)
  with pytest.raises(ValueError, match=r"activation_function='gelu_quick' is not supported"):
    GPT2Config(activation_function='gelu_quick')
  with pytest.raises(ValueError, match=r"position_embedding_type='relative_key' is not supported"):
    BertConfig.from_hf({'model_type': 'bert', 'position_embedding_type': 'relative_key'})
  with pytest.raises(ValueError, match=r"name='t5' is not a supported model family"):
    get_family('t5')


class CallsOnLoad:
  """A pickle of this calls a function when unpickled, as a malicious checkpoint would."""

  def __reduce__(self):
    return (print, ('unpickling ran code',))


def test_pickled_code_is_refused(tmp_path, capsys):
  path = tmp_path / 'pytorch_model.bin'
  torch.save({'w': torch.zeros(2), 'obj': CallsOnLoad()}, path)
  with pytest.raises(ValueError, match=r'could not be loaded with torch\.load\(weights_only=True\)'):
    load_state_dict(path)
  raw = tmp_path / 'raw.pt'
  raw.write_bytes(pickle.dumps({'w': CallsOnLoad()}, protocol=2))
  with pytest.raises(ValueError, match=r'weights_only=True'):
    load_state_dict(raw)
  assert 'unpickling ran code' not in capsys.readouterr().out


def test_plain_bin_state_dict_loads(tmp_path):
  path = tmp_path / 'pytorch_model.bin'
  torch.save({'w': torch.arange(3.0).to(torch.bfloat16)}, path)
  loaded = load_state_dict(tmp_path)  # a directory resolves to its checkpoint file
  assert loaded['w'].dtype == np.float32 and loaded['w'].tolist() == [0.0, 1.0, 2.0]


def test_tied_checkpoint_stored_under_the_head_name_loads(tmp_path):
  # `safetensors.torch.save_model` keeps one name per shared tensor: for a tied GPT-2 that is
  # `lm_head.weight`, with no `transformer.wte.weight`; transformers loads such a directory.
  from safetensors.torch import load_file, save_model

  from conversion import load_pretrained

  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8)
  ).eval()
  hf.config.save_pretrained(tmp_path)
  save_model(hf, str(tmp_path / 'model.safetensors'), metadata={'format': 'pt'})
  assert 'transformer.wte.weight' not in load_file(str(tmp_path / 'model.safetensors'))
  model, params, _ = load_pretrained(tmp_path)
  ids = np.array([[1, 5, 7, 3]])
  with torch.no_grad():
    want = hf(torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({'params': params}, jnp.asarray(ids))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_saved_inv_freq_rounded_to_the_checkpoint_dtype_is_accepted(llama, dtype):
  # Half-precision checkpoints (meta-llama/Llama-2-*-hf lists these buffers) store inv_freq rounded.
  config, state_dict = llama
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
  rounded = torch.from_numpy(inv_freq).to(dtype)
  assert not np.allclose(rounded.float().numpy(), inv_freq, rtol=1e-5, atol=0)  # the old check's tolerance
  params = LLAMA.torch_to_flax({**state_dict, 'model.layers.0.self_attn.rotary_emb.inv_freq': rounded}, config)
  assert set(params) == {'model', 'lm_head'}


def test_ignore_must_be_a_sequence_of_valid_regexes(llama):
  config, state_dict = llama
  with pytest.raises(TypeError, match=r"ignore must be a sequence of regexes, e\.g\. ignore=\('cls\\\\\.\.\*',\)"):
    LLAMA.torch_to_flax(state_dict, config, ignore=r'cls\..*')
  with pytest.raises(ValueError, match=r"ignore='lm_head\(' is not a valid regular expression"):
    LLAMA.torch_to_flax(state_dict, config, ignore=('lm_head(',))


def test_unknown_config_override_names_the_keyword(tmp_path):
  from conversion import load_pretrained

  transformers.BertConfig(
    vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
  ).save_pretrained(tmp_path)
  with pytest.raises(TypeError, match=r"config override\(s\) \['add_pooler_layer'\] are not fields of BertConfig"):
    load_pretrained(tmp_path, add_pooler_layer=False)


def test_input_longer_than_the_position_table_is_refused():
  from flax_adapters.models.bert import BertModel
  from flax_adapters.models.gpt2 import GPT2Model

  ids = jnp.zeros((1, 9), jnp.int32)
  gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8))
  with pytest.raises(ValueError, match=r'input_ids has length 9, but the model has n_positions=8'):
    gpt2.init(jax.random.key(0), ids)
  bert = BertModel(
    BertConfig(
      vocab_size=10,
      hidden_size=8,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=16,
      max_position_embeddings=8,
    )
  )
  with pytest.raises(ValueError, match=r'input_ids has length 9, but the model has max_position_embeddings=8'):
    bert.init(jax.random.key(0), ids)


def test_out_of_range_ids_are_refused_when_concrete():
  """An embedding lookup outside its table read NaN (GPT-2 positions, BERT tokens) or a wrong row (BERT
  token types) where torch raises; concrete ids are checked, traced ones (under jit) cannot be."""
  from flax_adapters.models.bert import BertModel
  from flax_adapters.models.gpt2 import GPT2LMHeadModel

  ids = jnp.ones((1, 4), jnp.int32)
  gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
  params = jax.jit(gpt2.init)(jax.random.key(0), ids)['params']  # traced: not checked
  with pytest.raises(ValueError, match=r'`position_ids` holds ids in \[0, 200\], but the model has n_positions=8 rows'):
    gpt2.apply({'params': params}, ids, None, jnp.array([[0, 1, 100, 200]]))
  with pytest.raises(ValueError, match=r'`input_ids` holds ids in \[1, 32\], but the model has vocab_size=32 rows'):
    gpt2.apply({'params': params}, ids.at[0, 0].set(32))
  bert = BertModel(
    BertConfig(
      vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, type_vocab_size=1
    )
  )
  params = jax.jit(bert.init)(jax.random.key(0), ids)['params']
  with pytest.raises(ValueError, match=r'`token_type_ids` holds ids in \[1, 1\], but the model has type_vocab_size=1'):
    bert.apply({'params': params}, ids, None, jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r'`input_ids` holds ids in \[-1, 1\]'):
    bert.apply({'params': params}, ids.at[0, 0].set(-1))
