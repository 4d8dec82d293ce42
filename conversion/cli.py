"""`flax-adapters-convert`: Hugging Face model directories <-> Flax parameter files.

  flax-adapters-convert to-flax  HF_DIR   OUT_DIR [--param-dtype bfloat16]
      writes OUT_DIR/config.json and OUT_DIR/flax_params.msgpack
  flax-adapters-convert to-torch FLAX_DIR OUT_DIR [--dtype bfloat16]
      writes OUT_DIR/config.json and OUT_DIR/model.safetensors (loadable by from_pretrained)
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


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='flax-adapters-convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  a = sub.add_parser('to-flax', help='HF directory -> config.json + flax_params.msgpack')
  a.add_argument('hf_dir')
  a.add_argument('out_dir')
  a.add_argument('--param-dtype', default='float32', choices=('float32', 'bfloat16', 'float16'))
  b = sub.add_parser('to-torch', help='flax directory -> HF directory (model.safetensors)')
  b.add_argument('flax_dir')
  b.add_argument('out_dir')
  b.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'))
  args = parser.parse_args(argv)
  try:
    if args.command == 'to-flax':
      to_flax(args.hf_dir, args.out_dir, args.param_dtype)
    else:
      to_torch(args.flax_dir, args.out_dir, args.dtype)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f'flax-adapters-convert: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
