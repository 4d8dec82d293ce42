"""Flax module paths, read the PyTorch way (`h_0` -> `h.0`), are HF's torch module names.

PEFT `target_modules` are matched against these dotted names, so this is what makes a PEFT adapter
config mean the same modules on both sides.
"""

import re
import subprocess
import sys

import pytest
import transformers

from conversion import get_family

# The generic reading of linen's list naming (as in flax_adapters.paths): any `name_N` -> `name.N`.
_LIST_SUFFIX = re.compile(r'^(.*\D)_(\d+)$')
# Our models' only lists: GPT-2 `h`, BERT `layer`, LLaMA `layers`.
_OUR_LISTS = re.compile(r'^(h|layer|layers)_(\d+)$')


def dotted(path, pattern=_LIST_SUFFIX):
  return '.'.join(f'{m.group(1)}.{m.group(2)}' if (m := pattern.match(p)) else p for p in path)


def torch_modules_with_params(model):
  return {
    name for name, module in model.named_modules() if name and any(True for _ in module.parameters(recurse=False))
  }


CASES = {
  'bert': lambda: transformers.BertModel(
    transformers.BertConfig(
      vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
  ),
  'llama': lambda: transformers.LlamaForCausalLM(
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
  ),
  'gpt2': lambda: transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
  ),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_dotted_flax_module_paths_equal_torch_module_names(name):
  hf = CASES[name]()
  family = get_family(name)
  config = family.config_from_hf(hf.config.to_dict())
  flax_modules = {dotted(path[:-1], _OUR_LISTS) for path in family.param_shapes(config)}
  torch_modules = torch_modules_with_params(hf)
  if getattr(config, 'tie_word_embeddings', False):
    torch_modules.discard('lm_head')  # the tied head owns no parameter of its own in flax
  assert flax_modules == torch_modules


@pytest.mark.parametrize('name', sorted(CASES))
def test_generic_list_reading_differs_only_on_gpt2_layer_norm_names(name):
  # GPT-2's torch modules are literally named `ln_1`/`ln_2`; read generically, `ln_1` looks like
  # item 1 of a list `ln`. Targets naming them must use the raw form (or avoid the suffix).
  family = get_family(name)
  config = family.config_from_hf(CASES[name]().config.to_dict())
  paths = [path[:-1] for path in family.param_shapes(config)]
  differing = {dotted(p) for p in paths} - {dotted(p, _OUR_LISTS) for p in paths}
  expected = {f'transformer.h.{i}.ln.{j}' for i in range(2) for j in (1, 2)} if name == 'gpt2' else set()
  assert differing == expected


def test_examples_from_the_design():
  gpt2 = get_family('gpt2').param_shapes(get_family('gpt2').config_from_hf({'n_embd': 32, 'n_layer': 1, 'n_head': 4}))
  assert ('transformer', 'h_0', 'attn', 'c_attn', 'kernel') in gpt2
  assert dotted(('transformer', 'h_0', 'attn', 'c_attn')) == 'transformer.h.0.attn.c_attn'


def test_flax_adapters_models_do_not_import_torch():
  code = (
    'import sys, flax_adapters.models.bert, flax_adapters.models.llama, flax_adapters.models.gpt2; '
    "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd='.')
  assert out.stdout.strip() == '[]'
