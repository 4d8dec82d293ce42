"""Helpers for tests against the PyTorch port (genomicsxai's `alphagenome-pytorch`): random real-width
models with realistic statistics, cheap copies that share weights, output comparison."""

from __future__ import annotations

import numpy as np
import torch

TRACK_HEADS = ('atac', 'dnase', 'procap', 'cage', 'rna_seq', 'chip_tf', 'chip_histone')


def random_port_model(dna: torch.Tensor, organism: torch.Tensor, seed: int = 0):
  """The port's `AlphaGenome` with random weights in which no layer is an identity.

  Parameters that the port initialises to constants (norm scales and biases, standardized-conv
  scales, residual scales, relative-position biases, the junction head's tissue parameters, head
  biases) are drawn at random, track means from [0.5, 2]; each batch-RMS norm's running variance is
  set to the mean square of its input on `dna` times a factor in [0.5, 1.5], as in a trained model,
  so activations keep realistic magnitudes through the 450M-parameter stack. Calibrate on other
  sequences than the tests run: statistics of the very input make some norms divide by almost
  nothing (e.g. the one pair position of a 2048 bp input), which amplifies float32 rounding.
  """
  from alphagenome_pytorch import AlphaGenome
  from alphagenome_pytorch.layers import RMSBatchNorm

  torch.manual_seed(seed)
  model = AlphaGenome().eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      leaf = name.rsplit('.', 1)[-1]
      if leaf in ('track_mask', 'tissue_mask', 'running_var'):
        continue
      if leaf == 'track_means':
        p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
      elif leaf == 'scale' or 'residual_scale' in name or (leaf == 'weight' and 'norm' in name):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif leaf == 'bias' or leaf in ('q_r_bias', 'k_r_bias') or 'rope_params' in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))

    def calibrate(module, args):
      x = args[0]
      feature = x.ndim - 1 if module.channels_last else 1
      mean_square = (x.double() ** 2).mean(tuple(d for d in range(x.ndim) if d != feature)).float()
      module.running_var.copy_(mean_square * (torch.rand(mean_square.shape, generator=g) + 0.5))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, RMSBatchNorm)]
    model(dna, organism, heads=('atac',))
    for h in hooks:
      h.remove()
  return model


def port_model_sharing(state_dict: dict, template):
  """A fresh port `AlphaGenome` whose tensors *are* `state_dict`'s (no copy, no init): for configs run side by side.

  The port's adapters wrap layers and freeze them without writing to them, and its merge builds new
  layers, so models prepared from the same state dict never disturb each other.
  """
  from alphagenome_pytorch import AlphaGenome

  with torch.device('meta'):
    model = AlphaGenome()
  model.load_state_dict(state_dict, strict=True, assign=True)
  # Non-persistent buffers (the splice heads' track masks) are not in state dicts.
  for name, buf in template.named_buffers():
    if name not in state_dict:
      module, leaf = name.rsplit('.', 1)
      setattr(model.get_submodule(module), leaf, buf)
  return model.eval()


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|, in float64."""
  a = np.asarray(ours, np.float64)
  b = theirs.detach().double().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _floating(x) -> bool:
  return x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(np.asarray(x).dtype, np.floating)


def output_errors(ours: dict, theirs: dict) -> dict[str, float]:
  """`{'head[/key]': relative error}` for every floating output in `theirs` (the port's, or another of ours)."""
  errors = {}
  for head, value in theirs.items():
    if isinstance(value, dict):
      for k, v in value.items():
        if _floating(v):
          errors[f'{head}/{k}'] = relative_error(ours[head][k], v)
    elif _floating(value):
      errors[head] = relative_error(ours[head], value)
  return errors
