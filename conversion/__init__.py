"""PyTorch <-> Flax checkpoint conversion for the BERT, LLaMA and GPT-2 families.

This package may import torch and safetensors; `flax_adapters` never does.
"""

from conversion.families import FAMILIES, Family, get_family
from conversion.pretrained import load_pretrained, save_pretrained
from conversion.state_dict import load_state_dict, save_safetensors, to_numpy

__all__ = [
    'FAMILIES', 'Family', 'get_family', 'load_pretrained', 'save_pretrained', 'load_state_dict',
    'save_safetensors', 'to_numpy',
]
