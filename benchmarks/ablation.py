"""What each speed change buys: the flax_adapters GPT-2 step with one change at a time undone.

    python -m benchmarks.ablation [--quick] [--mode lora|full|both] [--rounds 6]

In one process per (mode, malloc setting), every configuration below is compiled, and their steps are
interleaved in rounds (k steps of each configuration per round, alternating the order); each
configuration's median is reported with its median per-round ratio to `all` (every change on), in
wall time and in this process's CPU time (which a busy machine distorts less).
Every change is plain JAX or a `jax.custom_jvp` rule, so none costs forward-mode autodiff.

Model changes (`flax_adapters/models/`):

- `-fused_loss`: the loss taken from `__call__`'s logits (sliced, then `layers.cross_entropy`)
  instead of `GPT2LMHeadModel.loss`'s fused head + cross-entropy (a custom_jvp rule).
- `-stream_head`: with a frozen embedding (LoRA), the fused head's loss and `d/dh` from the whole
  `[tokens, vocab]` logits (formed, reduced, exponentiated and multiplied in separate passes)
  instead of `layers._head_ce_streamed`'s online softmax over vocabulary tiles.
- `-token_dot`: `nn.Dense`'s own `lax.dot_general` instead of `layers.token_dot_general` (the
  tokens flattened into one GEMM axis, so the kernel gradient is one xᵀ·g GEMM).
- `-attention`: `jax.nn.dot_product_attention` (what GPT-2 runs on GPU) instead of the plain
  heads-major causal attention on the split fused qkv that it runs on CPU.
- `-grad_store`: no per-block store of the residual stream's gradient (a custom_jvp identity whose
  tangent goes through a conditional, a fusion boundary; CPU only).
- `tile:<n>`: the streamed head's vocabulary tile (`layers._VOCAB_TILE`) set to n, e.g. `tile:1024`.

Core (`flax_adapters/methods/lora.py`):

- `-lora_flat`: LoRA's `scale·(x·A)·B` as einsums over the token axes instead of 2-D GEMMs over
  the flattened tokens (whose B gradient is one `(x·A)ᵀ·g` GEMM).

Training-step and compiler choices:

- `-partition`: the whole params tree differentiated, `transfer_optimizer` (multi_transform) on
  it, no buffer donation, instead of `make_train_step` on the partitioned trainable leaves.
- `naive`: all of the above undone at once (a plain JAX step on our model).
- `xla:<name>` (not adopted; measured for the README): XLA:CPU options, per compile
  (`compile(compiler_options=...)`, the same settings as `XLA_FLAGS`): `xla:no_ynn` (dots on
  XLA's own/Eigen emitters instead of YNNPACK), `xla:xnn` (XNNPACK dot fusions), `xla:ynn_all`
  (YNNPACK also for elementwise and reductions). oneDNN dot fusions
  (`--xla_cpu_use_onednn --xla_cpu_experimental_onednn_fusion_type=...DOT`) abort this step's
  compilation ("partition compile failed") in jax 0.10.2, so they are not in the list.
Each is run under the malloc settings named by `--malloc` (default: retain), in separate
processes, since glibc reads them at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.run import HERE, MALLOC, ROOT, say

CHANGES = ('fused_loss', 'stream_head', 'token_dot', 'attention', 'grad_store', 'lora_flat', 'partition')
_DOT = 'LIBRARY_FUSION_TYPE_DOT'
XLA_OPTIONS = {
  'no_ynn': {'xla_cpu_experimental_ynn_fusion_type': ''},
  'xnn': {
    'xla_cpu_experimental_ynn_fusion_type': '',
    'xla_cpu_use_xnnpack': True,
    'xla_cpu_experimental_xnn_fusion_type': _DOT,
  },
  'ynn_all': {'xla_cpu_experimental_ynn_fusion_type': f'{_DOT},LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE'},
}
CONFIGS = ['all'] + [f'-{c}' for c in CHANGES] + ['naive', 'tile:1024'] + [f'xla:{x}' for x in XLA_OPTIONS]


def _lora_einsums(specs, scale, x, a, b):
  """LoRA's product as plain einsums over the token axes (what `-lora_flat` runs)."""
  import jax.numpy as jnp

  xs, as_, ts, bs, ys = specs
  t = jnp.einsum(f'{xs},{as_}->{ts}', x, a) * jnp.asarray(scale, x.dtype)
  return jnp.einsum(f'{ts},{bs}->{ys}', t, b)


def _head_ce_unstreamed(h, embedding, labels, weights, *, grads):
  """The fused head's loss and d/dh from the whole logits (what `-stream_head` runs): the trained-
  embedding path, whose unused embedding-gradient GEMM XLA removes (the compiled dots are the same)."""
  from flax_adapters.models.layers import _head_ce_logits

  nll, dh, _ = _head_ce_logits(h, embedding, labels, weights)
  return nll, dh if grads else None


def _patched(off: set, tile: int | None = None):
  """Context manager that undoes the changes in `off` (module globals are read at trace time) and
  sets the head's vocabulary tile to `tile`."""
  import contextlib

  import flax.linen as nn

  from flax_adapters.methods import lora
  from flax_adapters.models import gpt2, layers

  @contextlib.contextmanager
  def ctx():
    saved = dict(
      dense=gpt2._dense,
      att=gpt2.causal_attention,
      res=gpt2._residual,
      fac=lora._factored,
      head=layers._head_ce_streamed,
      tile=layers._VOCAB_TILE,
    )
    try:
      if 'token_dot' in off:
        gpt2._dense = lambda features, name, dtype, param_dtype: nn.Dense(
          features, dtype=dtype, param_dtype=param_dtype, name=name
        )
      if 'attention' in off:

        def attention(qkv, mask, scale):
          q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
          return layers.dot_product_attention(q, k, v, scale=scale, mask=mask, is_causal=True)

        gpt2.causal_attention = attention
      if 'grad_store' in off:
        gpt2._residual = lambda x: x
      if 'stream_head' in off:
        layers._head_ce_streamed = _head_ce_unstreamed
      if 'lora_flat' in off:
        lora._factored = _lora_einsums
      if tile is not None:
        layers._VOCAB_TILE = tile
      yield
    finally:
      lora._factored, layers._head_ce_streamed = saved['fac'], saved['head']
      layers._VOCAB_TILE = saved['tile']
      gpt2._dense, gpt2.causal_attention, gpt2._residual = saved['dense'], saved['att'], saved['res']

  return ctx()


def worker(args):
  """One process: compile every configuration for one mode, then interleave their steps."""
  import jax
  import optax

  import flax_adapters as fa
  from benchmarks import jax_worker
  from flax_adapters.models import layers
  from flax_adapters.training import make_train_step

  ns = argparse.Namespace(mode=args.mode, size=args.size, weights=args.weights, gpu=False, bf16=False)
  s = jax_worker.build(ns)
  model_a, frozen, ids = s['model_a'], s['frozen'], s['ids']
  trainable = s['variants']['main']['trainable']
  # A separate copy for the whole-tree configurations (the split ones donate their leaves).
  params = jax.tree.map(lambda x: x.copy(), fa.combine(trainable, frozen))
  mask = fa.trainable_mask(model_a, params)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  configs = {}
  for name in args.configs:
    off = set(CHANGES) if name == 'naive' else ({name[1:]} if name.startswith('-') else set())
    options = XLA_OPTIONS[name[4:]] if name.startswith('xla:') else {}
    tile = int(name[5:]) if name.startswith('tile:') else None
    if 'fused_loss' in off:

      def loss_fn(p, x):
        logits = model_a.apply({'params': p}, x)
        return layers.cross_entropy(logits[:, :-1], x[:, 1:])
    else:
      loss_fn = lambda p, x: model_a.apply({'params': p}, x, method='loss')
    with _patched(off, tile):
      t0 = time.perf_counter()
      if 'partition' in off:
        opt = fa.transfer_optimizer(tx, mask)

        def step(p, state, x, loss_fn=loss_fn, opt=opt):
          loss, g = jax.value_and_grad(loss_fn)(p, x)
          u, state = opt.update(g, state, p)
          return optax.apply_updates(p, u), state, loss

        compiled = jax.jit(step).lower(params, opt.init(params), ids).compile(compiler_options=options)
        configs[name] = ('whole', compiled, opt, time.perf_counter() - t0)
      else:
        step = make_train_step(loss_fn, tx).lower(trainable, tx.init(trainable), frozen, ids)
        configs[name] = ('split', step.compile(compiler_options=options), tx, time.perf_counter() - t0)
  # One training state per layout, threaded through every configuration of that layout (values
  # do not matter for timing; donation consumes the inputs).
  state = {'split': [trainable, tx.init(trainable)]}
  if any(c[0] == 'whole' for c in configs.values()):
    whole_opt = next(c[2] for c in configs.values() if c[0] == 'whole')
    state['whole'] = [params, whole_opt.init(params)]

  def run(name):
    kind, compiled, _, _ = configs[name]
    c = time.process_time()
    t = time.perf_counter()
    if kind == 'split':
      st = state['split']
      st[0], st[1], loss = compiled(st[0], st[1], frozen, ids)
    else:
      st = state['whole']
      st[0], st[1], loss = compiled(st[0], st[1], ids)
    jax.block_until_ready((st, loss))
    return time.perf_counter() - t, time.process_time() - c

  for name in configs:  # warm-up
    run(name)
    run(name)
  times = {n: [] for n in configs}
  cpu = {n: [] for n in configs}
  loads = {n: [] for n in configs}
  order = list(configs)
  for r in range(args.rounds):
    common.wait_quiet(max_wait=20)
    for name in order if r % 2 == 0 else order[::-1]:
      for _ in range(args.steps):
        meter = common.LoadMeter()
        wall, cpu_s = run(name)
        times[name].append(wall)
        cpu[name].append(cpu_s)
        loads[name].append(meter.others())
  compile_s = {n: c[3] for n, c in configs.items()}
  print(json.dumps({'times': times, 'cpu_s': cpu, 'loads': loads, 'compile_s': compile_s}))


def round_ratios(times: dict, steps: int, base: str = 'all') -> dict:
  """Per configuration: the median over rounds of its round median over `base`'s round median."""
  n_rounds = len(times[base]) // steps
  med = lambda xs, r: statistics.median(xs[r * steps : (r + 1) * steps])
  return {
    name: statistics.median([med(ts, r) / med(times[base], r) for r in range(n_rounds)]) for name, ts in times.items()
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--mode', choices=('lora', 'full', 'both'), default='both')
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--malloc', default='retain')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--weights', help=argparse.SUPPRESS)
  p.add_argument('--configs', default=None, help='comma list of configurations (default: all of them)')
  args = p.parse_args(argv)
  args.size = 'quick' if args.quick else 'gpt2'
  if args.worker:
    args.configs = args.configs.split(',')
    return worker(args)
  chosen = args.configs.split(',') if args.configs else CONFIGS

  import tempfile

  result = {
    'machine': common.machine(),
    'size': args.size,
    'rounds': args.rounds,
    'steps': args.steps,
    'date': datetime.datetime.now().isoformat(timespec='seconds'),
    'runs': [],
  }
  modes = ('lora', 'full') if args.mode == 'both' else (args.mode,)
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'weights.npz')
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.make_weights', args.size, weights],
      cwd=ROOT,
      check=True,
      stderr=subprocess.DEVNULL,
    )
    for malloc in args.malloc.split(','):
      env = dict(os.environ, JAX_PLATFORMS='cpu', GLIBC_TUNABLES=MALLOC[malloc])
      for mode in modes:
        configs = [
          c for c in chosen if mode == 'lora' or not (c in ('-lora_flat', '-stream_head') or c.startswith('tile:'))
        ]
        if 'all' not in configs:
          configs.insert(0, 'all')
        say(f'[ablation] {mode}, malloc={malloc}: {configs}')
        out = subprocess.run(
          [
            sys.executable,
            '-m',
            'benchmarks.ablation',
            '--worker',
            '--mode',
            mode,
            '--weights',
            weights,
            '--configs',
            ','.join(configs),
            '--rounds',
            str(args.rounds),
            '--steps',
            str(args.steps),
          ]
          + (['--quick'] if args.quick else []),
          cwd=ROOT,
          check=True,
          capture_output=True,
          text=True,
          env=env,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        med = {n: statistics.median(v) for n, v in got['times'].items()}
        ratios = round_ratios(got['times'], args.steps)
        cpu_ratios = round_ratios(got['cpu_s'], args.steps)
        load = {n: statistics.median(v) for n, v in got['loads'].items()}
        result['runs'].append(
          {
            'mode': mode,
            'malloc': malloc,
            'median_s': med,
            'ratio_to_all': ratios,
            'cpu_ratio_to_all': cpu_ratios,
            **got,
          }
        )
        for n, v in med.items():
          print(
            f'{mode:5s} malloc={malloc:7s} {n:13s} {v:6.3f} s  x{ratios[n]:.3f} of all; CPU time x{cpu_ratios[n]:.3f} '
            f'(medians of per-round ratios; others took {load[n]:.2f} of the CPU)',
            flush=True,
          )
  out = os.path.join(HERE, 'results', f'ablation-{args.size}-{result["date"].replace(":", "")}.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  say(f'[ablation] wrote {out}')


if __name__ == '__main__':
  main()
