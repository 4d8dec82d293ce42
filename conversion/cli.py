"""`flax-adapters-convert`: Hugging Face model directories and PEFT adapters <-> Flax.

  flax-adapters-convert to-flax  HF_DIR   OUT_DIR [--param-dtype bfloat16]
      writes OUT_DIR/config.json and OUT_DIR/flax_params.msgpack
  flax-adapters-convert to-torch FLAX_DIR OUT_DIR [--dtype bfloat16]
      writes OUT_DIR/config.json and OUT_DIR/model.safetensors (loadable by from_pretrained)
  flax-adapters-convert import-peft PEFT_DIR BASE_DIR OUT_DIR [--overwrite]
      a PEFT LoRA/IA3 adapter -> a flax_adapters adapter checkpoint (save_adapters)
  flax-adapters-convert export-peft ADAPTERS_DIR BASE_DIR OUT_DIR [--task-type T] [--base-model-name-or-path P]
      a flax_adapters adapter checkpoint -> a PEFT adapter directory (PeftModel.from_pretrained)
  flax-adapters-convert export-merged ADAPTERS_DIR BASE_DIR OUT_DIR [--dtype bfloat16]
      adapters folded into the base -> an HF model directory (from_pretrained)

BASE_DIR is the base model: an HF directory (config.json + model.safetensors) or a to-flax output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
from flax import serialization

from conversion.families import get_family
from conversion.pretrained import load_pretrained, read_hf_config, save_pretrained

PARAMS_FILE = 'flax_params.msgpack'


def to_flax(hf_dir: str, out_dir: str, param_dtype: str = 'float32') -> None:
  _, params, config = load_pretrained(hf_dir, param_dtype=jnp.dtype(param_dtype))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(type(config).to_hf(config), f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, PARAMS_FILE), 'wb') as f:
    f.write(serialization.msgpack_serialize(params))


def to_torch(flax_dir: str, out_dir: str, dtype: str | None = None) -> None:
  hf = read_hf_config(flax_dir)
  config = get_family(hf['model_type']).config_from_hf(hf)
  path = os.path.join(flax_dir, PARAMS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{flax_dir!r} has no {PARAMS_FILE}; write one with `to-flax`.')
  with open(path, 'rb') as f:
    params = serialization.msgpack_restore(f.read())
  save_pretrained(out_dir, params, config, dtype=dtype)


def load_base(base_dir: str):
  """`(flax_model, params, config)` from an HF model directory or a `to-flax` output directory."""
  if os.path.isfile(os.path.join(base_dir, PARAMS_FILE)):
    hf = read_hf_config(base_dir)
    family = get_family(hf['model_type'])
    config = family.config_from_hf(hf)
    with open(os.path.join(base_dir, PARAMS_FILE), 'rb') as f:
      params = serialization.msgpack_restore(f.read())
    family.key_table(config)
    return family.flax_model(config), params, config
  return load_pretrained(base_dir)


def import_peft_cmd(peft_dir: str, base_dir: str, out_dir: str, overwrite: bool = False) -> str:
  from conversion.peft import import_peft  # pylint: disable=g-import-not-at-top
  from flax_adapters.checkpoint import save_adapters  # pylint: disable=g-import-not-at-top

  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir!r} exists; pass --overwrite to replace it.')
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
) -> dict:
  from conversion.peft import export_peft  # pylint: disable=g-import-not-at-top

  adapted, params, config = _restore(adapters_dir, base_dir)
  kwargs = {} if task_type == 'default' else {'task_type': None if task_type == 'none' else task_type}
  return export_peft(out_dir, adapted, params, config=config, base_model_name_or_path=base_model_name_or_path, **kwargs)


def export_merged_cmd(adapters_dir: str, base_dir: str, out_dir: str, dtype: str | None = None) -> None:
  from conversion.peft import export_merged  # pylint: disable=g-import-not-at-top

  adapted, params, config = _restore(adapters_dir, base_dir)
  export_merged(out_dir, adapted, params, config=config, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='flax-adapters-convert', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest='command', required=True)
  a = sub.add_parser('to-flax', help='HF directory -> config.json + flax_params.msgpack')
  a.add_argument('hf_dir')
  a.add_argument('out_dir')
  a.add_argument('--param-dtype', default='float32', choices=('float32', 'bfloat16', 'float16'))
  b = sub.add_parser('to-torch', help='flax directory -> HF directory (model.safetensors)')
  b.add_argument('flax_dir')
  b.add_argument('out_dir')
  b.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'))
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
  c.add_argument('--overwrite', action='store_true', help='replace out_dir if it exists')
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
    help="PEFT task_type (default: CAUSAL_LM for llama/gpt2, FEATURE_EXTRACTION for bert; 'none' for none)",
  )
  d.add_argument('--base-model-name-or-path', default=None, help='recorded as base_model_name_or_path')
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
  args = parser.parse_args(argv)
  try:
    if args.command == 'to-flax':
      to_flax(args.hf_dir, args.out_dir, args.param_dtype)
    elif args.command == 'to-torch':
      to_torch(args.flax_dir, args.out_dir, args.dtype)
    elif args.command == 'import-peft':
      print(import_peft_cmd(args.peft_dir, args.base_dir, args.out_dir, args.overwrite))
    elif args.command == 'export-peft':
      export_peft_cmd(args.adapters_dir, args.base_dir, args.out_dir, args.task_type, args.base_model_name_or_path)
      print(args.out_dir)
    else:
      export_merged_cmd(args.adapters_dir, args.base_dir, args.out_dir, args.dtype)
      print(args.out_dir)
  except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
    print(f'flax-adapters-convert: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
