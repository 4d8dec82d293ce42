"""Reading and writing PyTorch checkpoints as `{key: numpy array}` without unpickling code.

`.safetensors` files are read with `safetensors`; `.bin`/`.pt`/`.pth` files only with
`torch.load(..., weights_only=True)`, which refuses anything but tensors and plain containers.
numpy has no bfloat16, so bfloat16 tensors come out as float32 (exactly: every bfloat16 value is a
float32 value); callers cast to the parameter dtype they want.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection, Mapping
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

    if not isinstance(value, torch.Tensor):
      raise TypeError(
        f'state_dict[{key!r}] must be a torch.Tensor, jax.Array or numpy.ndarray, got {type(value).__name__}.'
      )
    tensor = value.detach().cpu()
    if tensor.layout != torch.strided:
      tensor = tensor.to_dense()  # a sparse tensor holds the same values as its dense form
    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
      tensor = tensor.float()  # bfloat16 and the float8 types have no numpy dtype
    try:
      array = tensor.numpy()
    except (TypeError, RuntimeError) as e:  # quantized, complex32, ...: no numpy dtype
      raise TypeError(
        f'state_dict[{key!r}] is a {tensor.dtype} tensor, which has no numpy equivalent ({e}); convert it to a '
        'float or integer tensor first.'
      ) from None
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


def _load_safetensors(path: str, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file (exactly `keys`, if given), read through torch for bfloat16."""
  from safetensors import safe_open

  try:
    # safe_open checks the header against the file's size before reading anything.
    with safe_open(path, framework='pt', device='cpu') as f:
      held = list(f.keys())
      matches = keys is None or set(keys) == set(held)
      tensors = {k: f.get_tensor(k) for k in (held if keys is None else keys)} if matches else {}
  except Exception as e:  # SafetensorError, OSError, ...: a damaged or truncated file
    raise ValueError(
      f'{path!r} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated, empty or '
      'damaged. Download or save it again.'
    ) from None
  if not matches:
    raise _shard_mismatch(path, keys, held)
  return {k: to_numpy(v, key=k) for k, v in tensors.items()}


def _load_pickle(path: str, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
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
  if keys is not None:
    if set(loaded) != set(keys):
      raise _shard_mismatch(path, keys, list(loaded))
    loaded = {k: loaded[k] for k in keys}
  import torch

  others = {k: type(v).__name__ for k, v in loaded.items() if not isinstance(v, torch.Tensor)}
  if others:
    nested = [k for k, v in loaded.items() if isinstance(v, Mapping)]
    hint = (
      f'it wraps one under {nested[0]!r}: load it yourself and save loaded[{nested[0]!r}]'
      if nested
      else 'drop them and save the tensors alone (model.state_dict())'
    )
    raise TypeError(
      f'{path!r} is not a plain state dict {{name: tensor}}: {len(others)} values are not tensors '
      f'({dict(list(others.items())[:4])}); {hint}.'
    )
  try:
    return {k: to_numpy(v, key=k) for k, v in loaded.items()}
  except TypeError as e:
    raise TypeError(f'{path!r}: {e}') from None


def _shard_mismatch(path: str, listed: Collection[str], held: Collection[str]) -> ValueError:
  missing, extra = sorted(set(listed) - set(held)), sorted(set(held) - set(listed))
  parts = []
  if missing:
    parts.append(f'lacks {len(missing)} tensors the index puts there ({missing[:3]})')
  if extra:
    parts.append(f'holds {len(extra)} tensors the index puts elsewhere or nowhere ({extra[:3]}; a stale copy?)')
  return ValueError(
    f'shard {path!r} does not match the sharded-checkpoint index: it {" and ".join(parts)}. Each tensor must '
    'be in exactly the shard its index names; re-save the checkpoint (save_pretrained) to rebuild both.'
  )


def _unique_keys(pairs):
  seen = {}
  for key, value in pairs:
    if key in seen and seen[key] != value:
      raise ValueError(f'key {key!r} appears twice, mapped to {seen[key]!r} and {value!r}')
    seen[key] = value
  return seen


def read_json_object(path: str, what: str) -> dict[str, Any]:
  """A JSON file that must hold an object; a clear error naming the file otherwise."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f, object_pairs_hook=_unique_keys)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path!r} is not a valid {what} JSON file ({e}). Fix or re-create it.') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path!r} must hold a JSON object ({what}), found a {type(data).__name__}.')
  return data


def _index_shards(path: str) -> dict[str, list[str]]:
  """`{shard file: [keys]}` from a sharded-checkpoint index, every shard inside the index's directory."""
  index = read_json_object(path, 'sharded-checkpoint index')
  weight_map = index.get('weight_map')
  if not isinstance(weight_map, Mapping) or not weight_map:
    raise ValueError(
      f"{path!r} has no 'weight_map' {{tensor name: shard file}} (found {type(weight_map).__name__}); "
      'it is not a sharded-checkpoint index.'
    )
  directory = os.path.dirname(os.path.abspath(path))
  shards: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    if not isinstance(shard, str) or not shard:
      raise ValueError(f'{path!r}: weight_map[{key!r}] is {shard!r}; expected a shard file name.')
    # Checked on the names, not through symlinks: the Hugging Face cache links each file to a blob.
    resolved = os.path.normpath(os.path.join(directory, shard))
    if os.path.isabs(shard) or os.path.commonpath([directory, resolved]) != directory:
      raise ValueError(
        f'{path!r}: weight_map[{key!r}] = {shard!r} points outside the model directory {directory!r}; '
        'shards are read only from beside their index.'
      )
    if not resolved.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
      raise ValueError(
        f'{path!r}: weight_map[{key!r}] = {shard!r} is not a weights file '
        f'(expected a name ending in {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}).'
      )
    shards.setdefault(resolved, []).append(key)
  for shard in shards:
    if not os.path.isfile(shard):
      raise FileNotFoundError(f'{path!r} names the shard {os.path.relpath(shard, directory)!r}, which does not exist.')
  return shards


def _load_index(path: str) -> dict[str, np.ndarray]:
  """Each tensor read from the shard the index names for it."""
  state_dict: dict[str, np.ndarray] = {}
  for shard, keys in sorted(_index_shards(path).items()):
    loader = _load_safetensors if shard.endswith(SAFETENSORS_SUFFIXES) else _load_pickle
    state_dict.update(loader(shard, keys))
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


def write_atomically(path: str | os.PathLike, write) -> None:
  """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename.

  A writer killed midway leaves the previous file (or none) at `path`, never a half-written one.
  """
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{name}.tmp-{uuid.uuid4().hex}')
  try:
    write(tmp)
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems cannot fsync a directory
  finally:
    os.close(fd)


def write_json(path: str | os.PathLike, data: Any) -> None:
  """`data` as indented JSON, written atomically (`write_atomically`)."""

  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)

  write_atomically(path, write)


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
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return
  from safetensors.numpy import save_file

  if dtype is not None:
    try:
      target = np.dtype(dtype)
    except TypeError:
      raise ValueError(f"dtype={dtype!r} is not a dtype name; use 'float32', 'float16', 'bfloat16' or None.") from None
    arrays = {k: (v.astype(target) if v.dtype.kind == 'f' else v) for k, v in arrays.items()}
  arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
  write_atomically(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
