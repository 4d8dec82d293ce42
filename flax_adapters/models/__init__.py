"""Flax (linen) definitions of Hugging Face model families, parameter-compatible with `transformers`.

Module paths mirror the PyTorch module names, with linen's list naming (`layers_0`) standing for
PyTorch's index (`layers.0`). Weights move between the two with the `conversion` package.
"""

from flax_adapters.models.bert import BertConfig, BertModel, BertOutput
from flax_adapters.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from flax_adapters.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = [
  'BertConfig',
  'BertModel',
  'BertOutput',
  'GPT2Config',
  'GPT2LMHeadModel',
  'GPT2Model',
  'LlamaConfig',
  'LlamaForCausalLM',
  'LlamaModel',
]
