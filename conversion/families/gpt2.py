"""GPT-2: HF `GPT2LMHeadModel` <-> `flax_adapters.models.gpt2.GPT2LMHeadModel`.

HF's `Conv1D` keeps its weight as `[in, out]`, the layout of an `nn.Dense` kernel, so no GPT-2
weight is transposed except an untied `lm_head` (a real `nn.Linear`).
"""

from __future__ import annotations

from conversion.families.base import Family
from conversion.key_mapping import Layout, Row
from flax_adapters.models.gpt2 import GPT2Config, GPT2LMHeadModel

I, T = Layout.IDENTITY, Layout.TRANSPOSE

ROWS = (
  # torch key                                flax path                                  layout  when
  Row('transformer.wte.weight', 'transformer/wte/embedding', I),
  Row('transformer.wpe.weight', 'transformer/wpe/embedding', I),
  Row('transformer.h.{i}.ln_1.weight', 'transformer/h_{i}/ln_1/scale', I),
  Row('transformer.h.{i}.ln_1.bias', 'transformer/h_{i}/ln_1/bias', I),
  Row('transformer.h.{i}.attn.c_attn.weight', 'transformer/h_{i}/attn/c_attn/kernel', I),
  Row('transformer.h.{i}.attn.c_attn.bias', 'transformer/h_{i}/attn/c_attn/bias', I),
  Row('transformer.h.{i}.attn.c_proj.weight', 'transformer/h_{i}/attn/c_proj/kernel', I),
  Row('transformer.h.{i}.attn.c_proj.bias', 'transformer/h_{i}/attn/c_proj/bias', I),
  Row('transformer.h.{i}.ln_2.weight', 'transformer/h_{i}/ln_2/scale', I),
  Row('transformer.h.{i}.ln_2.bias', 'transformer/h_{i}/ln_2/bias', I),
  Row('transformer.h.{i}.mlp.c_fc.weight', 'transformer/h_{i}/mlp/c_fc/kernel', I),
  Row('transformer.h.{i}.mlp.c_fc.bias', 'transformer/h_{i}/mlp/c_fc/bias', I),
  Row('transformer.h.{i}.mlp.c_proj.weight', 'transformer/h_{i}/mlp/c_proj/kernel', I),
  Row('transformer.h.{i}.mlp.c_proj.bias', 'transformer/h_{i}/mlp/c_proj/bias', I),
  Row('transformer.ln_f.weight', 'transformer/ln_f/scale', I),
  Row('transformer.ln_f.bias', 'transformer/ln_f/bias', I),
  Row('lm_head.weight', 'lm_head/kernel', T, 'not tie_word_embeddings'),
)

BUFFERS = (
  # transformers < 4.35 saved the causal mask and its fill value with every block.
  (r'transformer\.h\.\d+\.attn\.bias', 'causal-mask buffer; the flax model builds the mask'),
  (r'transformer\.h\.\d+\.attn\.masked_bias', 'mask fill value buffer; unused'),
)

FAMILY = Family(
  name='gpt2',
  hf_class_name='GPT2LMHeadModel',
  config_class=GPT2Config,
  model_class=GPT2LMHeadModel,
  rows=ROWS,
  num_layers_field='n_layer',
  hint_fields=('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head', 'n_inner', 'tie_word_embeddings'),
  trunk_prefix='transformer.',
  buffers=BUFFERS,
  tied_head=('lm_head.weight', 'transformer.wte.weight'),
)

torch_to_flax = FAMILY.torch_to_flax
flax_to_torch = FAMILY.flax_to_torch
