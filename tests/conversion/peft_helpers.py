"""Helpers for the PEFT interop tests: real `peft` adapters with non-trivial values, logits both sides."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import traverse_util

import flax_adapters as fa

# Float32 logits of the tiny models are O(1); PEFT and JAX add the same low-rank terms in a
# different order, so they agree to ~1e-6. 1e-4 is the bound every conversion test uses.
TOL = 1e-4


def make_adapter(hf, config, directory, *, seed=0):
  """Wrap `hf` with `config`, give every adapter tensor a random non-trivial value, save it.

  Returns the PEFT model (eval mode) and a copy of the base state dict taken before wrapping.
  LoRA B is N(0, 0.1) (PEFT starts it at zero), IA3 scales 1 + N(0, 0.3), and modules_to_save
  copies move by N(0, 0.05), so a dropped or misplaced tensor shows in the logits.
  """
  base = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  model = peft.get_peft_model(hf, config)
  gen = torch.Generator().manual_seed(seed)
  noise = lambda p, s: s * torch.randn(p.shape, generator=gen)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.copy_(noise(p, 0.1))
      elif 'ia3_l' in name:
        p.copy_(1.0 + noise(p, 0.3))
      elif 'modules_to_save' in name:
        p.add_(noise(p, 0.05))
  model.save_pretrained(directory)
  return model.eval(), base


def fresh(cls, hf_config, base_state_dict):
  """A new torch model holding the base weights (what `PeftModel.from_pretrained` is given)."""
  model = cls(hf_config)
  model.load_state_dict(base_state_dict, strict=True)
  return model.eval()


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.float().numpy()


def flax_logits(model, params, ids):
  return np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(ids)), np.float32)


def perturb(model, params, seed=1, scale=0.05):
  """Every trainable leaf (adapters and modules that train whole) moved by N(0, scale)."""
  mask = traverse_util.flatten_dict(fa.trainable_mask(model, params))
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  for k, trains in mask.items():
    if trains:
      flat[k] = flat[k] + jnp.asarray(scale * rng.normal(size=flat[k].shape), flat[k].dtype)
  return traverse_util.unflatten_dict(flat)


def leaf(params, dotted_path):
  node = params
  for k in dotted_path.split('/'):
    node = node[k]
  return np.asarray(node)
