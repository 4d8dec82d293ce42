"""Shared fixtures: offline Hugging Face, and torch on few threads (the CI machine has 2 cores)."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def torch_state_dict(flat: dict) -> dict:
  """numpy state dict -> torch tensors, for `load_state_dict`."""
  return {k: torch.from_numpy(v) for k, v in flat.items()}
