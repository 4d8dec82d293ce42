"""`flax-adapters-convert`: Hugging Face model directories and PEFT adapters <-> Flax.

  flax-adapters-convert to-flax  HF_DIR   OUT_DIR [--param-dtype bfloat16] [--ignore REGEX]... [--set FIELD=VALUE]...
                                 [--overwrite]
      writes OUT_DIR/config.json and OUT_DIR/flax_params.msgpack; --ignore drops the checkpoint keys a
      regex fully matches, deliberately (a task head: --ignore 'cls\\..*'), --set overrides a config field
      (--set add_pooling_layer=false; VALUE is read as JSON, else as a string)
  flax-adapters-convert to-torch FLAX_DIR OUT_DIR [--dtype bfloat16] [--overwrite]
      writes OUT_DIR/config.json and OUT_DIR/model.safetensors (loadable by from_pretrained)
  flax-adapters-convert import-peft PEFT_DIR BASE_DIR OUT_DIR [--overwrite]
      a PEFT LoRA/IA3 adapter -> a flax_adapters adapter checkpoint (save_adapters)
  flax-adapters-convert export-peft ADAPTERS_DIR BASE_DIR OUT_DIR [--task-type T] [--base-model-name-or-path P]
                                    [--overwrite]
      a flax_adapters adapter checkpoint -> a PEFT adapter directory (PeftModel.from_pretrained)
  flax-adapters-convert export-merged ADAPTERS_DIR BASE_DIR OUT_DIR [--dtype bfloat16] [--overwrite]
      adapters folded into the base -> an HF model directory (from_pretrained)

BASE_DIR is the base model: an HF directory (config.json + model.safetensors) or a to-flax output.
No command writes into its inputs. A non-empty OUT_DIR needs --overwrite, which replaces only the
files the command writes (import-peft: only a flax_adapters adapter checkpoint); other model or
adapter files there are refused, never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from conversion.peft import TASK_TYPES
from conversion.pretrained import load_pretrained, read_config, save_pretrained
from conversion.state_dict import write_atomically, write_json

PARAMS_FILE = 'flax_params.msgpack'
# The files each command writes into OUT_DIR; `--overwrite` replaces these and nothing else.
WRITES = {
  'to-flax': ('config.json', PARAMS_FILE),
  'to-torch': ('config.json', 'model.safetensors'),
  'export-peft': ('adapter_config.json', 'adapter_model.safetensors'),
  'export-merged': ('config.json', 'model.safetensors'),
}
# Files that make a directory a model or an adapter: left beside what a command writes, they would
# describe another model than the new files (or shadow them), so they are never mixed with ours.
_MODEL_FILES = re.compile(
  r'config\.json|flax_params\.msgpack|.*\.index\.json|adapter_config\.json|adapter_model\..*'
  r'|(model|pytorch_model|flax_model|tf_model)(-\d+-of-\d+)?\.(safetensors|bin|msgpack|h5)'
)


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def check_not_an_input(out_dir: str, inputs: dict[str, str]) -> None:
  """Every input must be an existing directory; OUT_DIR must be neither an input nor inside one or a file."""
  if not out_dir:
    raise ValueError('OUT_DIR is empty; name the directory to write.')
  for name, path in inputs.items():
    if not os.path.exists(path):
      raise FileNotFoundError(f'{name} {path!r} does not exist; check the path (expected a directory).')
    if not os.path.isdir(path):
      raise NotADirectoryError(f'{name} {path!r} is a file; expected a directory (name the folder that holds it).')
  out = _real(out_dir)
  parent = os.path.dirname(out)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(
      f'OUT_DIR {out_dir!r} is inside {parent!r}, which is a file; choose a path in a directory.'
    )
  for name, path in inputs.items():
    src = _real(path)
    if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
      where = 'is' if out == src else 'is inside'
      raise ValueError(
        f'OUT_DIR {out_dir!r} {where} the input {name} {path!r}; writing there would change the input. '
        'Choose another OUT_DIR.'
      )


def check_output(out_dir: str, inputs: dict[str, str], writes: tuple[str, ...], overwrite: bool) -> None:
  """Refuse an OUT_DIR that is (or is inside) an input, or that holds files this command did not write.

  A non-empty OUT_DIR needs `overwrite`, which then replaces only `writes`; other model or adapter
  files there would no longer match them, so they are refused rather than deleted or left stale.
  """
  check_not_an_input(out_dir, inputs)
  out = _real(out_dir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f'OUT_DIR {out_dir!r} is a file; name a directory.')
  entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if not entries:
    return
  if not overwrite:
    raise FileExistsError(
      f'OUT_DIR {out_dir!r} is not empty (it holds {entries[:6]}{" ..." if len(entries) > 6 else ""}); pass '
      f'--overwrite to replace its {" and ".join(writes)} (other files are kept), or choose an empty directory.'
    )
  foreign = [e for e in entries if e not in writes and _MODEL_FILES.fullmatch(e)]
  if foreign:
    raise FileExistsError(
      f'OUT_DIR {out_dir!r} holds {foreign[:6]}, which this command does not write: with the new '
      f'{" and ".join(writes)} they would describe another model. --overwrite replaces only files of the '
      'kind it writes; choose an empty directory, or remove those files yourself.'
    )


def _read_params(flax_dir: str) -> dict:
  path = os.path.join(flax_dir, PARAMS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{flax_dir!r} has no {PARAMS_FILE}; write one with `to-flax`.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    params = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises its own error types on damaged data
    raise ValueError(
      f'{path!r} is not a readable flax params file ({type(e).__name__}: {e}); it is truncated or damaged. '
      'Write it again with `to-flax`.'
    ) from None
  if not isinstance(params, dict) or not all(
    isinstance(v, np.ndarray) for v in traverse_util.flatten_dict(params).values()
  ):
    raise ValueError(
      f'{path!r} does not hold a tree of arrays (found {type(params).__name__}); write it with `to-flax`.'
    )
  return params


def _flax_base(flax_dir: str):
  """`(family, config, params)` of a to-flax directory, the params checked against the config's shapes."""
  family, config = read_config(flax_dir)
  params = _read_params(flax_dir)
  expected = family.param_shapes(config)
  flat = traverse_util.flatten_dict(params)
  wrong = sorted(
    '/'.join(k) + (f' {tuple(flat[k].shape)} (expected {tuple(expected[k].shape)})' if k in flat else ' missing')
    for k in set(flat) | set(expected)
    if k not in flat or k not in expected or tuple(flat[k].shape) != tuple(expected[k].shape)
  )
  if wrong:
    raise ValueError(
      f'{os.path.join(flax_dir, PARAMS_FILE)!r} does not match its config.json ({len(wrong)} leaves differ: '
      f'{wrong[:5]}{" ..." if len(wrong) > 5 else ""}). Write the directory again with `to-flax`.'
    )
  return family, config, params


def parse_overrides(items) -> dict:
  """`['add_pooling_layer=false', ...]` -> `{'add_pooling_layer': False}` (values JSON, else strings)."""
  out = {}
  for item in items or ():
    field, sep, text = item.partition('=')
    if not sep or not field.isidentifier():
      raise ValueError(
        f'--set {item!r}: expected FIELD=VALUE with a config field name, e.g. --set add_pooling_layer=false.'
      )
    if field in out:
      raise ValueError(f'--set gives {field} twice ({field}={out[field]!r}, then {item!r}); give each field once.')
    try:
      out[field] = json.loads(text)
    except json.JSONDecodeError:
      out[field] = text
  return out


def to_flax(
  hf_dir: str,
  out_dir: str,
  param_dtype: str = 'float32',
  overwrite: bool = False,
  ignore: tuple[str, ...] = (),
  overrides: dict | None = None,
) -> None:
  check_output(out_dir, {'HF_DIR': hf_dir}, WRITES['to-flax'], overwrite)
  _, params, config = load_pretrained(
    hf_dir, param_dtype=jnp.dtype(param_dtype), ignore=tuple(ignore), **(overrides or {})
  )
  os.makedirs(out_dir, exist_ok=True)
  data = serialization.msgpack_serialize(params)

  def write(tmp):
    with open(tmp, 'wb') as f:
      f.write(data)

  write_atomically(os.path.join(out_dir, PARAMS_FILE), write)
  write_json(os.path.join(out_dir, 'config.json'), type(config).to_hf(config))


def to_torch(flax_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False) -> None:
  check_output(out_dir, {'FLAX_DIR': flax_dir}, WRITES['to-torch'], overwrite)
  _, config, params = _flax_base(flax_dir)
  save_pretrained(out_dir, params, config, dtype=dtype)


def load_base(base_dir: str):
  """`(flax_model, params, config)` from an HF model directory or a `to-flax` output directory."""
  if os.path.isfile(os.path.join(base_dir, PARAMS_FILE)):
    family, config, params = _flax_base(base_dir)
    return family.flax_model(config), params, config
  return load_pretrained(base_dir)


def import_peft_cmd(peft_dir: str, base_dir: str, out_dir: str, overwrite: bool = False) -> str:
  from conversion.peft import import_peft  # pylint: disable=g-import-not-at-top
  from flax_adapters.checkpoint import save_adapters  # pylint: disable=g-import-not-at-top

  # OUT_DIR is one checkpoint directory: save_adapters replaces only a flax_adapters checkpoint.
  check_not_an_input(out_dir, {'PEFT_DIR': peft_dir, 'BASE_DIR': base_dir})
  if os.path.lexists(out_dir) and not overwrite:
    raise FileExistsError(
      f'{out_dir!r} exists; pass --overwrite to replace it (only an adapter checkpoint is replaced).'
    )
  model, params, config = load_base(base_dir)
  adapted, params = import_peft(peft_dir, model, params, config=config)
  return save_adapters(out_dir, adapted, params, overwrite=overwrite)


def _restore(adapters_dir: str, base_dir: str):
  from conversion.peft import restore_adapted  # pylint: disable=g-import-not-at-top

  model, params, config = load_base(base_dir)
  adapted, params = restore_adapted(adapters_dir, model, params)
  return adapted, params, config


def export_peft_cmd(
  adapters_dir: str,
  base_dir: str,
  out_dir: str,
  task_type: str | None = 'default',
  base_model_name_or_path: str | None = None,
  overwrite: bool = False,
) -> dict:
  from conversion.peft import check_task_type, export_peft  # pylint: disable=g-import-not-at-top

  kwargs = {} if task_type == 'default' else {'task_type': None if task_type == 'none' else task_type}
  check_task_type(kwargs.get('task_type'))
  check_output(out_dir, {'ADAPTERS_DIR': adapters_dir, 'BASE_DIR': base_dir}, WRITES['export-peft'], overwrite)
  adapted, params, config = _restore(adapters_dir, base_dir)
  return export_peft(out_dir, adapted, params, config=config, base_model_name_or_path=base_model_name_or_path, **kwargs)


def export_merged_cmd(
  adapters_dir: str, base_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False
) -> None:
  from conversion.peft import export_merged  # pylint: disable=g-import-not-at-top

  check_output(out_dir, {'ADAPTERS_DIR': adapters_dir, 'BASE_DIR': base_dir}, WRITES['export-merged'], overwrite)
  adapted, params, config = _restore(adapters_dir, base_dir)
  export_merged(out_dir, adapted, params, config=config, dtype=dtype)


_OVERWRITE_HELP = 'write into a non-empty out_dir, replacing its {} (and nothing else)'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='flax-adapters-convert', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest='command', required=True)
  a = sub.add_parser('to-flax', help='HF directory -> config.json + flax_params.msgpack')
  a.add_argument('hf_dir')
  a.add_argument('out_dir')
  a.add_argument('--param-dtype', default='float32', choices=('float32', 'bfloat16', 'float16'))
  a.add_argument(
    '--ignore',
    action='append',
    default=[],
    metavar='REGEX',
    help="drop the checkpoint keys this regex fully matches, e.g. 'cls\\..*'",
  )
  a.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='override a config field, e.g. add_pooling_layer=false',
  )
  a.add_argument('--overwrite', action='store_true', help=_OVERWRITE_HELP.format(' and '.join(WRITES['to-flax'])))
  b = sub.add_parser('to-torch', help='flax directory -> HF directory (model.safetensors)')
  b.add_argument('flax_dir')
  b.add_argument('out_dir')
  b.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'))
  b.add_argument('--overwrite', action='store_true', help=_OVERWRITE_HELP.format(' and '.join(WRITES['to-torch'])))
  base_help = 'base model: an HF directory (config.json + weights) or a to-flax output directory'
  c = sub.add_parser(
    'import-peft',
    help='PEFT LoRA/IA3 adapter directory -> flax_adapters adapter checkpoint',
    description='Read a PEFT adapter (adapter_config.json + adapter_model.safetensors) onto the converted '
    'base model and save it as a flax_adapters adapter checkpoint (orbax; load it with '
    'conversion.peft.restore_adapted). Unsupported PEFT options are refused, never dropped.',
  )
  c.add_argument('peft_dir', help='directory written by PEFT save_pretrained')
  c.add_argument('base_dir', help=base_help)
  c.add_argument('out_dir', help='adapter checkpoint directory to write')
  c.add_argument(
    '--overwrite',
    action='store_true',
    help='replace out_dir if it is a flax_adapters adapter checkpoint (nothing else)',
  )
  d = sub.add_parser(
    'export-peft',
    help='flax_adapters adapter checkpoint -> PEFT adapter directory',
    description='Write the adapters of a flax_adapters checkpoint as a PEFT directory that '
    'peft.PeftModel.from_pretrained(torch_model, OUT_DIR) loads (LoRA or IA3, with rank_pattern, '
    'alpha_pattern, modules_to_save and feedforward_modules as needed).',
  )
  d.add_argument('adapters_dir', help='adapter checkpoint (from import-peft or save_adapters)')
  d.add_argument('base_dir', help=base_help)
  d.add_argument('out_dir', help='PEFT directory to write')
  d.add_argument(
    '--task-type',
    default='default',
    choices=('default', 'none', *TASK_TYPES),
    help="PEFT task_type (default: CAUSAL_LM for llama/gpt2, FEATURE_EXTRACTION for bert; 'none' for none)",
  )
  d.add_argument('--base-model-name-or-path', default=None, help='recorded as base_model_name_or_path')
  d.add_argument('--overwrite', action='store_true', help=_OVERWRITE_HELP.format(' and '.join(WRITES['export-peft'])))
  e = sub.add_parser(
    'export-merged',
    help='adapters folded into the base -> HF model directory (model.safetensors)',
    description='Fold every adapter of a flax_adapters checkpoint into the base weights and write an HF '
    'model directory that from_pretrained loads (the same weights as PEFT merge_and_unload).',
  )
  e.add_argument('adapters_dir', help='adapter checkpoint (from import-peft or save_adapters)')
  e.add_argument('base_dir', help=base_help)
  e.add_argument('out_dir', help='HF model directory to write')
  e.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'))
  e.add_argument('--overwrite', action='store_true', help=_OVERWRITE_HELP.format(' and '.join(WRITES['export-merged'])))
  args = parser.parse_args(argv)
  try:
    if args.command == 'to-flax':
      to_flax(args.hf_dir, args.out_dir, args.param_dtype, args.overwrite, args.ignore, parse_overrides(args.set))
    elif args.command == 'to-torch':
      to_torch(args.flax_dir, args.out_dir, args.dtype, args.overwrite)
    elif args.command == 'import-peft':
      print(import_peft_cmd(args.peft_dir, args.base_dir, args.out_dir, args.overwrite))
    elif args.command == 'export-peft':
      export_peft_cmd(
        args.adapters_dir, args.base_dir, args.out_dir, args.task_type, args.base_model_name_or_path, args.overwrite
      )
      print(args.out_dir)
    else:
      export_merged_cmd(args.adapters_dir, args.base_dir, args.out_dir, args.dtype, args.overwrite)
      print(args.out_dir)
  except (ValueError, TypeError, OSError) as e:
    print(f'flax-adapters-convert: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
