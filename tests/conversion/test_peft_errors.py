"""Malformed or unsupported PEFT inputs and unexportable adapters: clear errors, tested on the message.

Plus the matching rules: `PeftSpec` decides targets, ranks, alphas, feedforward and modules_to_save
exactly as PEFT's own functions do, checked on every module name of a tiny LLaMA and GPT-2.
"""

import json
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import peft
import pytest
import torch
from peft.tuners.ia3.model import IA3Model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

import flax_adapters as fa
from conversion import get_family
from conversion.peft import (
  PeftSpec,
  export_merged,
  export_peft,
  import_peft,
  module_map,
  parse_peft_config,
  pattern_key,
)
from tests.conversion.peft_helpers import make_adapter
from tests.conversion.test_gpt2 import tiny_gpt2
from tests.conversion.test_llama import tiny_llama

LLAMA = get_family('llama')
GPT2 = get_family('gpt2')
IDS = jax.ShapeDtypeStruct((1, 8), jnp.int32)


@pytest.fixture(scope='module')
def llama_adapter(tmp_path_factory):
  """A valid LoRA adapter (q_proj, v_proj; r=4) of a tiny LLaMA, and the flax base."""
  directory = tmp_path_factory.mktemp('peft') / 'lora'
  hf = tiny_llama()
  _, base = make_adapter(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']), directory)
  config = LLAMA.config_from_hf(hf.config.to_dict())
  return directory, LLAMA.flax_model(config), LLAMA.torch_to_flax(base, config)


def edited(src, dst, *, tensors=None, config=None):
  """A copy of the adapter `src` with its tensors and/or config changed by the given functions."""
  shutil.copytree(src, dst)
  if tensors is not None:
    state = load_file(dst / 'adapter_model.safetensors')
    save_file(tensors(state), dst / 'adapter_model.safetensors')
  if config is not None:
    raw = json.loads((dst / 'adapter_config.json').read_text())
    (dst / 'adapter_config.json').write_text(json.dumps(config(raw)))
  return dst


def imported(llama_adapter, directory):
  _, model, params = llama_adapter
  return import_peft(directory, model, params)


Q0 = 'base_model.model.model.layers.0.self_attn.q_proj'


def test_valid_adapter_imports(llama_adapter):
  model, _ = imported(llama_adapter, llama_adapter[0])
  assert len(model.plan) == 4


def test_wrong_shape(llama_adapter, tmp_path):
  d = edited(llama_adapter[0], tmp_path / 'a', tensors=lambda s: {**s, f'{Q0}.lora_A.weight': torch.zeros(3, 64)})
  with pytest.raises(
    ValueError,
    match=(
      rf"wrong shape: '{Q0}\.lora_A\.weight' has shape \(3, 64\), expected \(4, 64\) \(rank 4 from r=4; "
      r'layer 64 -> 64\)\. Fix: check r/rank_pattern/feedforward_modules'
    ),
  ):
    imported(llama_adapter, d)


def test_missing_key(llama_adapter, tmp_path):
  d = edited(
    llama_adapter[0], tmp_path / 'a', tensors=lambda s: {k: v for k, v in s.items() if k != f'{Q0}.lora_B.weight'}
  )
  with pytest.raises(
    ValueError,
    match=(
      rf"missing key: '{Q0}\.lora_B\.weight' \(shape \(64, 4\)\) is not in the file, but target_modules selects "
      r"'model\.layers\.0\.self_attn\.q_proj' in this model\. Fix: import it onto the base model it was made for "
      r'\(base_model_name_or_path='
    ),
  ):
    imported(llama_adapter, d)


def test_unexpected_keys(llama_adapter, tmp_path):
  up = 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'
  d = edited(
    llama_adapter[0],
    tmp_path / 'a',
    tensors=lambda s: {
      **s,
      up: torch.zeros(4, 64),
      'model.layers.0.self_attn.q_proj.lora_A.weight': torch.zeros(4, 64),
      'base_model.model.model.norm.weight': torch.ones(64),
    },
  )
  with pytest.raises(ValueError) as info:
    imported(llama_adapter, d)
  message = str(info.value)
  assert message.startswith('Cannot import the PEFT LORA adapter in ')
  # (PEFT saves target_modules from a set, so their order varies.)
  assert re.search(
    rf"unexpected key: '{up}': adapter_config.json's target_modules=\['[qv]_proj', '[qv]_proj'\] does "
    r"not select module 'model\.layers\.0\.mlp\.up_proj', so PEFT would not load this tensor",
    message,
  )
  assert (
    "unexpected key: 'model.layers.0.self_attn.q_proj.lora_A.weight' does not start with 'base_model.model.'" in message
  )
  assert (
    "unexpected key: 'base_model.model.model.norm.weight' is neither a LoRA/IA3 tensor of a targeted module "
    'nor part of a modules_to_save module (modules_to_save=None)'
  ) in message


def test_target_module_the_flax_model_lacks(llama_adapter, tmp_path):
  """An adapter made on a 3-layer model, loaded onto the 2-layer base."""
  hf = tiny_llama(num_hidden_layers=3)
  make_adapter(hf, peft.LoraConfig(r=4, target_modules=['q_proj']), tmp_path / 'deeper')
  with pytest.raises(
    ValueError,
    match=(
      r"unknown module: 'base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_A\.weight' adapts target "
      r"module 'model\.layers\.2\.self_attn\.q_proj' that the flax model lacks \(LlamaForCausalLM has no such layer\)"
    ),
  ):
    imported(llama_adapter, tmp_path / 'deeper')


def test_unsupported_peft_type(llama_adapter, tmp_path):
  make_adapter(tiny_llama(), peft.LoHaConfig(r=4, target_modules=['q_proj']), tmp_path / 'loha')
  with pytest.raises(
    ValueError,
    match=(
      r"adapter_config\.json has peft_type='LOHA'; import_peft reads \['LORA', 'IA3'\] only .* Fix: merge the "
      r'adapter in PyTorch \(PeftModel\.merge_and_unload\(\)\)'
    ),
  ):
    imported(llama_adapter, tmp_path / 'loha')


def test_dora_is_refused(llama_adapter, tmp_path):
  make_adapter(tiny_llama(), peft.LoraConfig(r=4, target_modules=['q_proj'], use_dora=True), tmp_path / 'dora')
  with pytest.raises(
    ValueError,
    match=(
      r'adapter_config\.json sets use_dora=True: DoRA \(a learned magnitude vector per output feature\) is not '
      r'implemented\. Fix: train the adapter without it, or merge the adapter in PyTorch'
    ),
  ):
    imported(llama_adapter, tmp_path / 'dora')


@pytest.mark.parametrize(
  'field, value, message',
  [
    (
      'bias',
      'all',
      r"sets bias='all': PEFT then also trains the base layers' biases, which is not implemented\. "
      r"Fix: train with bias='none'",
    ),
    ('lora_bias', True, r'sets lora_bias=True: LoRA with a trained bias on lora_B is not implemented'),
    ('target_parameters', ['mlp.experts.down_proj'], r"sets target_parameters=\['mlp\.experts\.down_proj'\]"),
    ('init_lora_weights', 'pissa', r"sets init_lora_weights='pissa': this initialisation rewrites the base weights"),
    ('some_future_option', 3, r'sets some_future_option=3: import_peft does not know this LORA option'),
  ],
)
def test_unsupported_options(llama_adapter, tmp_path, field, value, message):
  d = edited(llama_adapter[0], tmp_path / 'a', config=lambda c: {**c, field: value})
  with pytest.raises(ValueError, match=message):
    imported(llama_adapter, d)


def test_bin_weights_are_read_without_unpickling_code(llama_adapter, tmp_path):
  d = edited(llama_adapter[0], tmp_path / 'a')
  state = load_file(d / 'adapter_model.safetensors')
  (d / 'adapter_model.safetensors').unlink()
  torch.save(state, d / 'adapter_model.bin')
  model, _ = imported(llama_adapter, d)
  assert len(model.plan) == 4

  class Payload:
    def __reduce__(self):
      return (print, ('unpickled!',))

  (d / 'adapter_model.bin').write_bytes(pickle.dumps({'x': Payload()}))
  with pytest.raises(ValueError, match=r'could not be loaded with torch\.load\(weights_only=True\)'):
    imported(llama_adapter, d)


# -- export refusals -------------------------------------------------------------------------


@pytest.fixture(scope='module')
def gpt2():
  hf = tiny_gpt2(n_layer=1)
  config = GPT2.config_from_hf(hf.config.to_dict())
  return GPT2.flax_model(config), GPT2.torch_to_flax(hf.state_dict(), config)


@pytest.mark.parametrize(
  'adapters, extra, message',
  [
    (
      {'c_fc': fa.Houlsby(latent_dim=4, placement='linear')},
      {},
      r'transformer\.h\.0\.mlp\.c_fc has a houlsby adapter, which PEFT\'s LoRA/IA3 formats cannot hold',
    ),
    (
      {'c_attn': fa.LoRA(rank=4), 'c_fc': fa.IA3()},
      {},
      r'it mixes IA3 and LORA adapters, but a PEFT directory holds one adapter type\. Fix: export one model per type',
    ),
    (
      {'c_fc': [fa.IA3(), fa.IA3FF()]},
      {},
      r'transformer\.h\.0\.mlp\.c_fc has both ia3_ff and ia3, but PEFT keeps one IA3 adapter per module',
    ),
    (
      {'c_fc': fa.LoRA(rank=4)},
      {'modules_to_save': ['h.0.mlp']},
      r'transformer\.h\.0\.mlp both trains whole and carries an adapter; PEFT never adapts a modules_to_save module',
    ),
    (
      {'c_fc': fa.LoRA(rank=4)},
      {'modules_to_save': ['wte']},
      r'transformer\.wte trains whole, but GPT2LMHeadModel ties it to its LM head and PEFT would train an untied copy',
    ),
    (
      {'c_attn': fa.LoRA(rank=4), 'c_fc': fa.LoRA(rank=4, dropout=0.5)},
      {},
      r"its LoRA modules use different dropouts \(\{0\.0: \['transformer\.h\.0\.attn\.c_attn'\], 0\.5: "
      r"\['transformer\.h\.0\.mlp\.c_fc'\]\}\), but adapter_config\.json has one lora_dropout",
    ),
  ],
  ids=['houlsby', 'lora_and_ia3', 'ia3_and_ia3_ff', 'adapter_in_saved_module', 'tied_embedding', 'two_dropouts'],
)
def test_export_refuses_what_peft_cannot_express(gpt2, tmp_path, adapters, extra, message):
  model, params = gpt2
  adapted, p = fa.adapt(model, params, adapters, IDS, **extra)
  with pytest.raises(ValueError, match=r'export_peft cannot write this model as a PEFT adapter: ' + message):
    export_peft(tmp_path / 'out', adapted, p)
  assert not (tmp_path / 'out').exists()


def test_export_merged_refuses_houlsby(gpt2, tmp_path):
  model, params = gpt2
  adapted, p = fa.adapt(model, params, {'c_fc': fa.Houlsby(latent_dim=4, placement='linear')}, IDS)
  with pytest.raises(
    ValueError,
    match=r"export_merged: adapters \{'transformer\.h\.0\.mlp\.c_fc': \['houlsby'\]\} "
    r'cannot be folded into the base weights',
  ):
    export_merged(tmp_path / 'out', adapted, p)


# -- the matching rules are PEFT's -----------------------------------------------------------


def _names(family, hf):
  return module_map(family, family.config_from_hf(hf.config.to_dict())).names()


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(target_modules=['q_proj', 'mlp.up_proj', 'model.layers.1.self_attn.o_proj']),
    dict(target_modules=r'.*layers\.\d\.(self_attn\.k_proj|mlp\..*_proj)'),
    dict(target_modules=['q_proj', 'up_proj'], exclude_modules=['layers.0.self_attn.q_proj']),
    dict(target_modules=['v_proj', 'down_proj'], exclude_modules=r'.*\.1\..*'),
    dict(target_modules=['q_proj', 'down_proj'], layers_to_transform=[1]),
    dict(target_modules=['q_proj'], layers_to_transform=0, layers_pattern=['layers']),
    dict(target_modules=['q_proj', 'lm_head', 'up_proj'], modules_to_save=['lm_head', 'layers.1.mlp']),
  ],
)
def test_target_matching_equals_peft(kwargs):
  names = _names(LLAMA, tiny_llama()) + _names(GPT2, tiny_gpt2())
  config = peft.LoraConfig(**kwargs)
  spec = parse_peft_config(config.to_dict())
  for name in names:
    assert spec.targets(name) == bool(check_target_module_exists(config, name)), name


def test_pattern_keys_feedforward_and_modules_to_save_equal_peft():
  names = _names(LLAMA, tiny_llama())
  patterns = ['layers.1.self_attn.q_proj', 'q_proj', r'layers\.0\..*', 'mlp.up', 'proj', 'model.layers.1.mlp.down_proj']
  for name in names:
    assert PeftSpec('LORA', {}).rank_alpha(name) == (8, 8)
    for order in (patterns, patterns[::-1]):
      assert pattern_key(order, name) == get_pattern_key(order, name), (order, name)
  for ff in (['down_proj', 'proj'], r'.*\.0\.mlp\.down_proj'):
    config = peft.IA3Config(target_modules=r'.*', feedforward_modules=ff)
    spec = PeftSpec('IA3', config.to_dict())
    for name in names:
      assert spec.feedforward(name) == IA3Model._check_target_module_feedforward(config, name), name
  spec = PeftSpec('LORA', {'modules_to_save': ['lm_head', 'norm']})
  assert [n for n in names if spec.saves(n)] == [
    'lm_head',
    'model.layers.0.input_layernorm',
    'model.layers.0.post_attention_layernorm',
    'model.layers.1.input_layernorm',
    'model.layers.1.post_attention_layernorm',
    'model.norm',
  ]


def test_nested_modules_to_save_is_refused(tmp_path):
  # PEFT matches modules_to_save with str.endswith: ['attn'] wraps 'h.0.attn' and, inside it,
  # 'h.0.attn.c_attn', and then cannot load its own save; importing it would be a guess.
  hf = tiny_gpt2(n_layer=1)
  _, base = make_adapter(hf, peft.LoraConfig(r=4, target_modules=['c_fc'], modules_to_save=['attn']), tmp_path / 'p')
  config = GPT2.config_from_hf(hf.config.to_dict())
  with pytest.raises(
    ValueError,
    match=r"modules_to_save=\['attn'\] selects 'transformer\.h\.0\.attn' and, inside it, 'transformer\.h\.0\.attn\.c_attn'",
  ):
    import_peft(tmp_path / 'p', GPT2.flax_model(config), GPT2.torch_to_flax(base, config))


def test_a_directory_of_named_adapters_points_at_the_subfolder(llama_adapter, tmp_path):
  directory, model, params = llama_adapter
  shutil.copytree(directory, tmp_path / 'root' / 'mine')
  with pytest.raises(
    FileNotFoundError, match=r"holds the named adapter\(s\) \['mine'\] .* pass adapter_dir='.*/root/mine'"
  ):
    import_peft(tmp_path / 'root', model, params)


def test_null_init_and_rslora_read_as_peft_reads_them():
  """`init_lora_weights: null` draws no special init and `use_rslora: null` is falsy in PEFT: plain LoRA
  (they were refused, the first as 'rewrites the base weights')."""
  base = dict(peft_type='LORA', r=4, lora_alpha=8, target_modules=['q_proj'])
  spec = parse_peft_config({**base, 'init_lora_weights': None, 'use_rslora': None})
  assert spec.module_settings('model.layers.0.self_attn.q_proj')['use_rslora'] is False
  with pytest.raises(ValueError, match=r"use_rslora='yes'; expected true or false"):
    parse_peft_config({**base, 'use_rslora': 'yes'})


@pytest.mark.parametrize(
  'family, task_type', [('bert', 'CAUSAL_LM'), ('bert', 'SEQ_2_SEQ_LM'), ('gpt2', 'SEQ_2_SEQ_LM')]
)
def test_export_refuses_a_task_type_the_class_cannot_load(tmp_path, family, task_type):
  """PEFT wraps CAUSAL_LM / SEQ_2_SEQ_LM in generating classes: BertModel (and any decoder-only model for
  seq2seq) then fails in PeftModel.from_pretrained; export_peft wrote the directory anyway."""
  import transformers

  fam = get_family(family)
  if family == 'bert':
    hf = transformers.BertModel(
      transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
      )
    )
  else:
    hf = tiny_gpt2()
  config = fam.config_from_hf(hf.config.to_dict())
  model, params = fam.flax_model(config), fam.torch_to_flax(hf.state_dict(), config)
  target = 'query' if family == 'bert' else 'c_attn'
  adapted, p = fa.adapt(model, params, {target: fa.LoRA(rank=2)}, jax.ShapeDtypeStruct((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=rf"`task_type`='{task_type}' cannot be loaded onto {fam.hf_class_name}"):
    export_peft(tmp_path / 'out', adapted, p, task_type=task_type)
  assert not (tmp_path / 'out').exists()


# -- configs PEFT refuses, and errors that name what decides -----------------------------------


@pytest.mark.parametrize(
  'config_cls, raw, message',
  [
    (
      peft.LoraConfig,
      dict(peft_type='LORA', r=4, target_modules=r'.*q_proj', layers_to_transform=[1]),
      r"sets layers_to_transform=\[1\] with target_modules as a regex string \('\.\*q_proj'\); PEFT applies "
      r'layers_to_transform to a list of module names only and refuses this config .* Fix: select the layers '
      r'inside the regex',
    ),
    (
      peft.LoraConfig,
      dict(peft_type='LORA', r=4, target_modules=r'.*q_proj', layers_pattern='layers'),
      r"sets layers_pattern='layers' with target_modules as a regex string",
    ),
    (
      peft.LoraConfig,
      dict(peft_type='LORA', r=4, target_modules=['q_proj'], layers_pattern='layers'),
      r"sets layers_pattern='layers' but layers_to_transform=None; PEFT refuses this config .* Fix: add "
      r'layers_to_transform',
    ),
    (
      peft.IA3Config,
      dict(peft_type='IA3', target_modules=['k_proj', 'mlp.down_proj'], feedforward_modules=['down_proj']),
      r"has feedforward_modules entries \['down_proj'\] that are not in target_modules=\['k_proj', "
      r"'mlp\.down_proj'\]; PEFT refuses this config .* Fix: list each feedforward module in target_modules",
    ),
  ],
  ids=['layers_to_transform_with_regex', 'layers_pattern_with_regex', 'layers_pattern_alone', 'ia3_ff_not_target'],
)
def test_configs_peft_itself_refuses_are_refused(config_cls, raw, message):
  """PEFT cannot load these (its config's __post_init__ raises); import_peft read them, dropping
  layers_to_transform / layers_pattern or reading feedforward_modules that PEFT never would."""
  with pytest.raises(ValueError):
    config_cls(**{k: v for k, v in raw.items() if k != 'peft_type'})
  with pytest.raises(ValueError, match=message):
    parse_peft_config(raw)


@pytest.mark.parametrize(
  'change, message',
  [
    (
      {'exclude_modules': ['layers.1.self_attn.q_proj']},
      r"exclude_modules=\['layers\.1\.self_attn\.q_proj'\] excludes module 'model\.layers\.1\.self_attn\.q_proj'",
    ),
    (
      {'layers_to_transform': [0]},
      r"layers_to_transform=\[0\] \(layers_pattern=None\) leaves out module 'model\.layers\.1\.self_attn\.q_proj'",
    ),
  ],
  ids=['exclude_modules', 'layers_to_transform'],
)
def test_an_unloaded_tensor_names_the_option_that_leaves_its_module_out(llama_adapter, tmp_path, change, message):
  """The message said "target_modules=['q_proj', 'v_proj'] does not select module ...q_proj", which it does."""
  d = edited(llama_adapter[0], tmp_path / 'a', config=lambda c: {**c, **change})
  with pytest.raises(ValueError) as info:
    imported(llama_adapter, d)
  assert re.search(
    rf"unexpected key: 'base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight': "
    rf"adapter_config\.json's {message}, so PEFT would not load this tensor",
    str(info.value),
  ), str(info.value)
  assert 'does not select' not in str(info.value)


def test_import_peft_refuses_an_adapted_model_and_params_that_are_not_a_dict(llama_adapter):
  directory, model, params = llama_adapter
  adapted, p = import_peft(directory, model, params)
  with pytest.raises(TypeError, match=r'`model` is an AdaptedModel, which already carries adapters.*adapted\.base'):
    import_peft(directory, adapted, p)  # was: "`config` is required"
  with pytest.raises(TypeError, match=r"`params` must be the base model's params .* found NoneType"):
    import_peft(directory, model, None)  # was: AssertionError from flax


def test_lora_on_a_tied_head_is_one_clear_refusal(tmp_path):
  """GPT-2's lm_head shares wte: one line says so (there were four, one blaming the base model's config)."""
  hf = tiny_gpt2(n_layer=1)
  _, base = make_adapter(hf, peft.LoraConfig(r=4, target_modules=['lm_head', 'c_attn']), tmp_path / 'p')
  config = GPT2.config_from_hf(hf.config.to_dict())
  with pytest.raises(ValueError) as info:
    import_peft(tmp_path / 'p', GPT2.flax_model(config), GPT2.torch_to_flax(base, config))
  lines = str(info.value).splitlines()[1:]
  assert len(lines) == 1, lines
  assert re.fullmatch(
    r"  - unsupported: target_modules selects 'lm_head', which the torch model ties to the input embedding: .* "
    r"Fix: untie the head in the base model .*, drop 'lm_head' from target_modules, or merge the adapter in PyTorch.*",
    lines[0],
  )


def test_a_tied_embedding_in_modules_to_save_is_not_also_an_unexpected_key(tmp_path):
  hf = tiny_llama(tie_word_embeddings=True)
  cfg = peft.LoraConfig(r=4, target_modules=['q_proj'], modules_to_save=['embed_tokens'])
  _, base = make_adapter(hf, cfg, tmp_path / 'p')
  config = LLAMA.config_from_hf(hf.config.to_dict())
  with pytest.raises(ValueError) as info:
    import_peft(tmp_path / 'p', LLAMA.flax_model(config), LLAMA.torch_to_flax(base, config))
  lines = str(info.value).splitlines()[1:]
  assert len(lines) == 1 and "modules_to_save selects 'model.embed_tokens', which the torch model ties" in lines[0]


def test_an_adapter_of_another_architecture_says_so_first(llama_adapter, gpt2):
  """A LLaMA adapter onto GPT-2 listed 'transformer.model.layers.0.self_attn.q_proj' (GPT-2's trunk prefix
  guessed onto LLaMA names) as missing layers; the first line now says the model is the wrong one."""
  model, params = gpt2
  with pytest.raises(ValueError) as info:
    import_peft(llama_adapter[0], model, params)
  first = str(info.value).splitlines()[1]
  assert re.fullmatch(
    r"  - wrong model: none of the 4 modules the file adapts \(e\.g\. 'model\.layers\.0\.self_attn\.[qv]_proj'\) is "
    r"a module of GPT2LMHeadModel \(family 'gpt2'\); the adapter was made for another model .* Fix: import it onto "
    r'a base model of that architecture\.',
    first,
  ), first


def test_export_to_a_path_that_is_a_file(gpt2, tmp_path):
  model, params = gpt2
  adapted, p = fa.adapt(model, params, {'c_attn': fa.LoRA(rank=2)}, IDS)
  (tmp_path / 'out').write_text('not a directory')
  with pytest.raises(FileExistsError, match=r"adapter_dir='.*/out' is a file; export_peft writes a directory"):
    export_peft(tmp_path / 'out', adapted, p)
  assert (tmp_path / 'out').read_text() == 'not a directory'
