"""LLaMA: HF `LlamaForCausalLM` <-> `flax_adapters.models.llama.LlamaForCausalLM`."""

from __future__ import annotations

import numpy as np

from conversion.families.base import Family
from conversion.key_mapping import Layout, Row
from flax_adapters.models.llama import LlamaConfig, LlamaForCausalLM, inverse_frequencies

I, T = Layout.IDENTITY, Layout.TRANSPOSE

ROWS = (
  # torch key                                          flax path                                      layout  when
  Row('model.embed_tokens.weight', 'model/embed_tokens/embedding', I),
  Row('model.layers.{i}.input_layernorm.weight', 'model/layers_{i}/input_layernorm/scale', I),
  Row('model.layers.{i}.self_attn.q_proj.weight', 'model/layers_{i}/self_attn/q_proj/kernel', T),
  Row('model.layers.{i}.self_attn.q_proj.bias', 'model/layers_{i}/self_attn/q_proj/bias', I, 'attention_bias'),
  Row('model.layers.{i}.self_attn.k_proj.weight', 'model/layers_{i}/self_attn/k_proj/kernel', T),
  Row('model.layers.{i}.self_attn.k_proj.bias', 'model/layers_{i}/self_attn/k_proj/bias', I, 'attention_bias'),
  Row('model.layers.{i}.self_attn.v_proj.weight', 'model/layers_{i}/self_attn/v_proj/kernel', T),
  Row('model.layers.{i}.self_attn.v_proj.bias', 'model/layers_{i}/self_attn/v_proj/bias', I, 'attention_bias'),
  Row('model.layers.{i}.self_attn.o_proj.weight', 'model/layers_{i}/self_attn/o_proj/kernel', T),
  Row('model.layers.{i}.self_attn.o_proj.bias', 'model/layers_{i}/self_attn/o_proj/bias', I, 'attention_bias'),
  Row('model.layers.{i}.post_attention_layernorm.weight', 'model/layers_{i}/post_attention_layernorm/scale', I),
  Row('model.layers.{i}.mlp.gate_proj.weight', 'model/layers_{i}/mlp/gate_proj/kernel', T),
  Row('model.layers.{i}.mlp.gate_proj.bias', 'model/layers_{i}/mlp/gate_proj/bias', I, 'mlp_bias'),
  Row('model.layers.{i}.mlp.up_proj.weight', 'model/layers_{i}/mlp/up_proj/kernel', T),
  Row('model.layers.{i}.mlp.up_proj.bias', 'model/layers_{i}/mlp/up_proj/bias', I, 'mlp_bias'),
  Row('model.layers.{i}.mlp.down_proj.weight', 'model/layers_{i}/mlp/down_proj/kernel', T),
  Row('model.layers.{i}.mlp.down_proj.bias', 'model/layers_{i}/mlp/down_proj/bias', I, 'mlp_bias'),
  Row('model.norm.weight', 'model/norm/scale', I),
  Row('lm_head.weight', 'lm_head/kernel', T, 'not tie_word_embeddings'),
)

BUFFERS = (
  # Non-persistent in current transformers, but older versions saved them.
  (r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq', 'rotary inverse frequencies, from the config'),
  (r'model\.rotary_emb\.(original_)?inv_freq', 'rotary inverse frequencies, from the config'),
)


def check_inv_freq(key: str, value: np.ndarray, config: LlamaConfig) -> None:
  """A saved `inv_freq` must be what the config's RoPE settings give, or outputs would differ."""
  ours = inverse_frequencies(config)
  # Checkpoints store the buffer in their own dtype (float16 in meta-llama/Llama-2-*-hf, bfloat16 in
  # others): allow bfloat16 rounding. A real RoPE mismatch (theta, factor, llama3 band) is far larger.
  if value.shape != ours.shape or not np.allclose(value, ours, rtol=2**-8, atol=0):
    raise ValueError(
      f'state_dict[{key!r}] (rotary inverse frequencies, shape {tuple(value.shape)}) does not match '
      f'the config (rope_theta={config.rope_theta}, rope_type={config.rope_type!r}, '
      f'head_dim={config.head_dim}, shape {tuple(ours.shape)}). Fix: set the RoPE fields of the config '
      'to those the checkpoint was trained with.'
    )


FAMILY = Family(
  name='llama',
  hf_class_name='LlamaForCausalLM',
  config_class=LlamaConfig,
  model_class=LlamaForCausalLM,
  rows=ROWS,
  num_layers_field='num_hidden_layers',
  hint_fields=(
    'vocab_size',
    'hidden_size',
    'intermediate_size',
    'num_hidden_layers',
    'num_attention_heads',
    'num_key_value_heads',
    'head_dim',
    'attention_bias',
    'mlp_bias',
    'tie_word_embeddings',
  ),
  trunk_prefix='model.',
  buffers=BUFFERS,
  check_buffer=check_inv_freq,
  tied_head=('lm_head.weight', 'model.embed_tokens.weight'),
)

torch_to_flax = FAMILY.torch_to_flax
flax_to_torch = FAMILY.flax_to_torch
