"""Write one random GPT-2 (and PEFT's initial LoRA A matrices) that both sides start from.

Run as `python -m benchmarks.make_weights SIZE OUT.npz`. Sharing the initial weights makes the two
sides' losses comparable step by step: the benchmark checks they compute the same loss.
"""

from __future__ import annotations

import sys

import numpy as np


def main(size: str, out: str) -> None:
  import torch
  import transformers
  from peft import LoraConfig, get_peft_model

  from benchmarks.setup_cfg import LORA, SIZES, hf_config_dict

  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(size)))
  arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  peft_model = get_peft_model(
    model,
    LoraConfig(
      r=LORA['rank'], lora_alpha=LORA['alpha'], target_modules=LORA['targets'], lora_dropout=0.0, fan_in_fan_out=True
    ),
  )
  for name, p in peft_model.named_parameters():
    if 'lora_A' in name:
      arrays['peft:' + name] = p.detach().numpy().copy()
  s = SIZES[size]
  arrays['input_ids'] = torch.randint(0, s['vocab_size'], (s['batch'], s['seq'])).numpy()
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
