"""Reading and writing PyTorch checkpoints as `{key: numpy array}` without unpickling code.

`.safetensors` files are read with `safetensors`; `.bin`/`.pt`/`.pth` files only with
`torch.load(..., weights_only=True)`, which refuses anything but tensors and plain containers.
numpy has no bfloat16, so bfloat16 tensors come out as float32 (exactly: every bfloat16 value is a
float32 value); callers cast to the parameter dtype they want.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

SAFETENSORS_SUFFIXES = ('.safetensors',)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth')
# What `from_pretrained` looks for in a model directory, in its order of preference.
DIRECTORY_FILES = (
  'model.safetensors',
  'model.safetensors.index.json',
  'pytorch_model.bin',
  'pytorch_model.bin.index.json',
)


def to_numpy(value: Any, *, key: str = '?') -> np.ndarray:
  """A torch tensor, jax array or numpy array as a numpy array; bfloat16 becomes float32.

  Examples:
    >>> import torch
    >>> to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype
    dtype('float32')
  """
  if isinstance(value, np.ndarray):
    array = value
  elif type(value).__module__.startswith('torch'):
    import torch

    tensor = value.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
      tensor = tensor.float()  # bfloat16 and the float8 types have no numpy dtype
    array = tensor.numpy()
  elif hasattr(value, '__array__'):
    array = np.asarray(value)
  else:
    raise TypeError(
      f'state_dict[{key!r}] must be a torch.Tensor, jax.Array or numpy.ndarray, got {type(value).__name__}.'
    )
  if array.dtype.kind == 'V' or array.dtype.name.startswith(('bfloat16', 'float8')):
    array = array.astype(np.float32)  # ml_dtypes arrays (e.g. from a bfloat16 jax.Array)
  return array


def _check_path(path: str | os.PathLike, argument: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{argument}={path!r} does not exist.')
  return path


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  # Through torch, because safetensors' numpy reader cannot represent bfloat16.
  from safetensors.torch import load_file

  return {k: to_numpy(v, key=k) for k, v in load_file(path, device='cpu').items()}


def _load_pickle(path: str) -> dict[str, np.ndarray]:
  import torch

  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError for anything but plain data
    raise ValueError(
      f'{path!r} could not be loaded with torch.load(weights_only=True) ({e}). Only plain tensor '
      'state dicts are read; re-save the checkpoint as safetensors or as model.state_dict().'
    ) from e
  if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
    raise TypeError(
      f'{path!r} holds a {type(loaded).__name__}, not a state dict {{name: tensor}}; if it wraps one '
      "(e.g. under 'state_dict' or 'model'), load it yourself and pass that mapping."
    )
  return {k: to_numpy(v, key=k) for k, v in loaded.items()}


def _load_index(path: str) -> dict[str, np.ndarray]:
  with open(path) as f:
    weight_map = json.load(f).get('weight_map')
  if not isinstance(weight_map, Mapping):
    raise ValueError(f"{path!r} has no 'weight_map' {{key: shard file}}; it is not a sharded-checkpoint index.")
  directory = os.path.dirname(path)
  state_dict: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    state_dict.update(load_state_dict(os.path.join(directory, shard)))
  return state_dict


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a checkpoint file or model directory into `{key: numpy array}`.

  Args:
    path: a `.safetensors` file, a `.bin`/`.pt`/`.pth` file (read with `weights_only=True`), a
      sharded-checkpoint `*.index.json`, or a directory holding one of `DIRECTORY_FILES`.

  Returns:
    The tensors as numpy arrays, bfloat16 widened to float32.
  """
  path = _check_path(path, 'path')
  if os.path.isdir(path):
    for name in DIRECTORY_FILES:
      candidate = os.path.join(path, name)
      if os.path.exists(candidate):
        return load_state_dict(candidate)
    raise FileNotFoundError(f'path={path!r} is a directory without a checkpoint; expected one of {DIRECTORY_FILES}.')
  if path.endswith('.index.json'):
    return _load_index(path)
  if path.endswith(SAFETENSORS_SUFFIXES):
    return _load_safetensors(path)
  if path.endswith(PICKLE_SUFFIXES):
    return _load_pickle(path)
  raise ValueError(
    f'path={path!r} has an unknown checkpoint suffix; expected {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES} '
    'or a sharded *.index.json.'
  )


def save_safetensors(
  state_dict: Mapping[str, Any],
  path: str | os.PathLike,
  *,
  dtype: str | None = None,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Write `{key: array}` as a safetensors file that `transformers` reads.

  Args:
    state_dict: arrays (numpy, jax or torch).
    path: output file.
    dtype: cast floating tensors to this dtype name first (`'float32'`, `'float16'`,
      `'bfloat16'`); None keeps each tensor's dtype.
    metadata: extra string metadata; `{'format': 'pt'}` is always written, since
      `from_pretrained` checks it.
  """
  arrays = {k: to_numpy(v, key=k) for k, v in state_dict.items()}
  meta = {'format': 'pt', **(metadata or {})}
  if dtype == 'bfloat16':
    # numpy cannot hold bfloat16; torch rounds to it exactly as torch's `.to(bfloat16)` does.
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    tensors = {k: (t.to(torch.bfloat16) if t.is_floating_point() else t.clone()) for k, t in tensors.items()}
    save_file(tensors, os.fspath(path), metadata=meta)
    return
  from safetensors.numpy import save_file

  if dtype is not None:
    try:
      target = np.dtype(dtype)
    except TypeError:
      raise ValueError(f"dtype={dtype!r} is not a dtype name; use 'float32', 'float16', 'bfloat16' or None.") from None
    arrays = {k: (v.astype(target) if v.dtype.kind == 'f' else v) for k, v in arrays.items()}
  save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.fspath(path), metadata=meta)
