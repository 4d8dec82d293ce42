"""PyTorch <-> Flax checkpoint conversion for the BERT, LLaMA and GPT-2 families.

This package may import torch and safetensors; `flax_adapters` never does.
"""

from conversion.families import FAMILIES, Family, get_family
from conversion.peft import export_merged, export_peft, import_peft, restore_adapted
from conversion.pretrained import load_pretrained, save_pretrained
from conversion.state_dict import load_state_dict, save_safetensors, to_numpy

__all__ = [
  'FAMILIES',
  'Family',
  'export_merged',
  'export_peft',
  'get_family',
  'import_peft',
  'load_pretrained',
  'load_state_dict',
  'restore_adapted',
  'save_pretrained',
  'save_safetensors',
  'to_numpy',
]
