"""Shared helpers for the core tests."""

from __future__ import annotations

import itertools

import jax
import numpy as np
from flax import traverse_util

import flax_adapters as fa
from flax_adapters.methods import LEAF_NAMES

ADAPTER_MODES = ('lora', 'locon', 'ia3', 'houlsby')
# Every subset of the adapter modes, plus the two modes that stand for themselves.
COMBINATIONS = [('linear',), ('full',)] + [c for r in range(1, 5) for c in itertools.combinations(ADAPTER_MODES, r)]

TARGETS = dict(
  lora_targets=['q_proj', 'v_proj', 'mix', 'o_proj'],
  locon_targets=['conv1d', 'conv2d'],
  ia3_targets=['k_proj', 'v_proj'],
  ia3_ff_targets=['fc2', 'o_proj'],
)


def config(mode, **overrides):
  kw = dict(TARGETS, lora_rank=2, lora_alpha=4, locon_rank=3)
  kw.update(overrides)
  return fa.TransferConfig(mode=list(mode) if isinstance(mode, tuple) else mode, **kw)


def perturb(params, key, scale=0.1):
  """Give every adapter leaf a random non-trivial value, as training would."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, (k, v) in enumerate(sorted(flat.items())):
    if k[-1] in LEAF_NAMES:
      noise = scale * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
      v = v + noise
    out[k] = v
  return traverse_util.unflatten_dict(out)


def max_diff(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def n_params(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
