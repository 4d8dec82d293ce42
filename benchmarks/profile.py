"""Where a training step's time goes, on each side: XLA ops (from a jax.profiler trace joined with the
optimized HLO) and torch ops (torch.profiler).

    python -m benchmarks.profile [--quick] [--mode lora|full] [--steps 2]

Writes benchmarks/results/profile-<size>-<mode>-<time>.json and prints both breakdowns. The JAX
worker runs with `--xla_cpu_enable_xprof_traceme` (per-op trace events) and an HLO dump; the op
names in the trace are matched to the dumped HLO's `op_name` metadata to tell forward from backward
and which module an op belongs to. On several cores XLA runs independent ops concurrently, so the
sum of op times can exceed the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

from benchmarks import common
from benchmarks.run import HERE, ROOT, Worker, say

MODULES = ('c_attn', 'attn/c_proj', 'mlp/c_fc', 'mlp/c_proj', 'ln_1', 'ln_2', 'ln_f', 'wte', 'wpe')


def _hlo_metadata(hlo_text: str) -> dict:
  meta = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(', line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      meta[m.group(1)] = (op.group(1) if op else '', m.group(2))
  return meta


def _category(name: str, op: str) -> tuple[str, str, str]:
  phase = 'backward' if 'transpose(' in op else 'forward'
  if 'closed_call' in op or 'while/body' in op or 'loss' in op.split('/')[-1] or op.endswith('/exp'):
    where = 'LM head + loss'
  else:
    where = next((m for m in MODULES if f'/{m}/' in op or op.endswith(f'/{m}')), None)
    if where is None:
      if '/attn/' in op:
        where = 'attention core'
      elif '/mlp/' in op:
        where = 'mlp (gelu)'
      elif 'GPT2LMHeadModel' in op:
        where = 'LM head + loss' if 'h_' not in op else 'residual adds'
      else:
        where = 'optimizer + other'
  if re.search(r'/[a-zA-Z]*Z[a-zA-Z]*,[a-zA-Z]*->', op):  # einsums with LoRA's rank axis Z
    where = 'lora'
  kind = 'gemm' if (name.startswith('ynn_fusion') and 'dot_general' in op) or name.startswith('dot') else 'other'
  return phase, where, kind


def jax_profile(trace_dir: str, hlo_path: str, steps: int) -> dict:
  meta = _hlo_metadata(open(hlo_path).read())
  trace = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)[0]
  events = [e for e in json.load(gzip.open(trace))['traceEvents'] if e.get('ph') == 'X' and e['name'] in meta]
  by_cat = collections.defaultdict(float)
  by_op = collections.defaultdict(float)
  for e in events:
    op, shape = meta[e['name']]
    by_cat[_category(e['name'], op)] += e['dur'] / 1e3 / steps
    short = re.sub(r'h_\d+', 'h_*', op.replace('jit(step)/', ''))
    by_op[(re.sub(r'\.\d+$', '', e['name']), shape, short[-90:])] += e['dur'] / 1e3 / steps
  return {
    'op_ms_per_step': sum(by_cat.values()),
    'by_category': sorted(([*k, round(v, 1)] for k, v in by_cat.items()), key=lambda r: -r[-1]),
    'top_ops': sorted(([*k, round(v, 1)] for k, v in by_op.items()), key=lambda r: -r[-1])[:30],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--mode', choices=('lora', 'full'), default='lora')
  p.add_argument('--steps', type=int, default=2)
  args = p.parse_args(argv)
  args.size = 'quick' if args.quick else 'gpt2'
  args.gpu = args.bf16 = False
  result = {
    'machine': common.machine(),
    'size': args.size,
    'mode': args.mode,
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
  }
  with tempfile.TemporaryDirectory() as tmp:
    args.tmp, args.weights = tmp, os.path.join(tmp, 'weights.npz')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.make_weights', args.size, args.weights],
      cwd=ROOT,
      check=True,
      env=env,
      stderr=subprocess.DEVNULL,
    )
    dump = os.path.join(tmp, 'dump')
    jenv = dict(
      env,
      XLA_FLAGS=' '.join(
        [
          env.get('XLA_FLAGS', ''),
          '--xla_cpu_enable_xprof_traceme=true',
          f'--xla_dump_to={dump}',
          '--xla_dump_hlo_as_text',
          '--xla_dump_hlo_module_re=.*step.*',
        ]
      ),
    )
    jw = Worker(f'jax_{args.mode}', 'jax_worker', args, jenv)
    try:
      jw.call('setup')
      common.wait_quiet()
      timed = jw.call('steps', n=3)
      trace_dir = os.path.join(tmp, 'trace')
      jw.call('trace', steps=args.steps, out=trace_dir)
    finally:
      jw.close()
    hlo = [f for f in glob.glob(os.path.join(dump, '*jit_step*.cpu_after_optimizations.txt'))][0]
    result['jax'] = {'step_s': timed['times'], **jax_profile(trace_dir, hlo, args.steps)}
    tw = Worker(f'torch_{args.mode}', 'torch_worker', args, env)
    try:
      tw.call('setup')
      common.wait_quiet()
      timed = tw.call('steps', n=3)
      result['torch'] = {'step_s': timed['times'], **tw.call('profile', steps=args.steps, top=30)}
    finally:
      tw.close()
  out = os.path.join(HERE, 'results', f'profile-{args.size}-{args.mode}-{result["date"].replace(":", "")}.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  j, t = result['jax'], result['torch']
  print(f'flax_adapters {args.mode} step: {min(j["step_s"]):.3f}s; XLA op time per step {j["op_ms_per_step"]:.0f} ms')
  print('  ms/step  phase     where               kind')
  for phase, where, kind, ms in j['by_category']:
    print(f'  {ms:7.1f}  {phase:9s} {where:19s} {kind}')
  print(f'PEFT {args.mode} step: {min(t["step_s"]):.3f}s; top torch ops (self time)')
  for r in t['ops']:
    print(f'  {r["self_ms_per_step"]:7.1f}  x{r["calls_per_step"]:<5.0f} {r["op"]}')
  say(f'[profile] wrote {out}')


if __name__ == '__main__':
  main()
