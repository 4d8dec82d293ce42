"""Registry of the supported Hugging Face model families, keyed by `config.json`'s `model_type`."""

from __future__ import annotations

from conversion.families import bert, gpt2, llama
from conversion.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (bert.FAMILY, llama.FAMILY, gpt2.FAMILY)}


def get_family(name: str) -> Family:
  """The `Family` for an HF `model_type` (`'bert'`, `'llama'`, `'gpt2'`).

  Examples:
    >>> get_family('gpt2').hf_class_name
    'GPT2LMHeadModel'
  """
  try:
    return FAMILIES[name]
  except (KeyError, TypeError):
    raise ValueError(f'name={name!r} is not a supported model family; expected one of {sorted(FAMILIES)}.') from None


__all__ = ['FAMILIES', 'Family', 'get_family']
