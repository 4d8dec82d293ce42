"""What each speed change buys: the flax_adapters GPT-2 step with one change at a time undone.

    python -m benchmarks.ablation [--quick] [--mode lora|full|both] [--rounds 4]

In one process per (mode, malloc setting), every configuration below is compiled, and their steps are
interleaved in rounds (k steps of each configuration per round, alternating the order); each
configuration's median is reported with its ratio to `all` (every change on). Configurations:

- `all`: what the benchmark runs.
- `-fused_loss`: the loss taken from `__call__`'s logits (sliced, then `layers.cross_entropy`)
  instead of `GPT2LMHeadModel.loss`'s fused, chunked head + cross-entropy.
- `-dense_vjp`: `nn.Dense`'s own autodiff instead of the custom VJP whose kernel gradient is one
  `xᵀ·g` GEMM.
- `-grad_store`: no per-block conditional on the residual stream's gradient.
- `-attention`: `jax.nn.dot_product_attention` (via `layers.dot_product_attention`) instead of the
  custom-VJP causal attention on the fused qkv.
- `-partition`: the whole params tree differentiated, `transfer_optimizer` (multi_transform) on
  it, no buffer donation, instead of `make_train_step` on the partitioned trainable leaves.
- `naive`: all of the above undone at once (a plain JAX LoRA step on our model).
- `+lora_vjp` (LoRA only): a change the library does not make, measured for the record: a custom VJP
  for LoRA's `scale·(x·A)·B` that orders B's gradient GEMM for XLA:CPU. It would cost users
  forward-mode autodiff (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) through every adapted layer.

Each is run under the malloc settings named by `--malloc` (default: default,retain), in separate
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

CHANGES = ('fused_loss', 'dense_vjp', 'grad_store', 'attention', 'partition')
CONFIGS = ['all'] + [f'-{c}' for c in CHANGES] + ['naive', '+lora_vjp']


def _lora_custom_vjp():
  """LoRA's factored product with a hand-written VJP (B's gradient as `(x·A)ᵀ·g`, rank axis first)."""
  import functools

  import jax
  import jax.numpy as jnp

  def forward(specs, scale, x, a, b):
    xs, as_, ts, bs, ys = specs
    t = jnp.einsum(f'{xs},{as_}->{ts}', x, a) * jnp.asarray(scale, x.dtype)
    return jnp.einsum(f'{ts},{bs}->{ys}', t, b), t

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
  def factored(specs, scale, x, a, b):
    return forward(specs, scale, x, a, b)[0]

  def fwd(specs, scale, x, a, b):
    y, t = forward(specs, scale, x, a, b)
    return y, (x, a, b, t)

  def bwd(specs, scale, residuals, g):
    xs, as_, ts, bs, ys = specs
    x, a, b, t = residuals
    db = jnp.einsum(f'{ts},{ys}->{bs}', t, g)
    gt = jnp.einsum(f'{ys},{bs}->{ts}', g, b) * jnp.asarray(scale, g.dtype)
    return (
      jnp.einsum(f'{ts},{as_}->{xs}', gt, a).astype(x.dtype),
      jnp.einsum(f'{ts},{xs}->{as_}', gt, x).astype(a.dtype),
      db.astype(b.dtype),
    )

  factored.defvjp(fwd, bwd)
  return factored


def _patched(off: set, on: frozenset = frozenset()):
  """Context manager that undoes the changes in `off` and makes those in `on` (module globals are
  read at trace time)."""
  import contextlib

  import jax
  import jax.numpy as jnp

  from flax_adapters.methods import lora
  from flax_adapters.models import gpt2, layers

  @contextlib.contextmanager
  def ctx():
    saved = dict(linear=gpt2._linear, mat=gpt2._materialize_grad, att=gpt2._causal_attention, fac=lora._factored)
    try:
      if 'dense_vjp' in off:
        gpt2._linear = lambda x, k: jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))
      if 'grad_store' in off:
        gpt2._materialize_grad = lambda x: x
      if 'attention' in off:

        def attention(qkv, mask, scale):
          q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
          y = layers.dot_product_attention(q, k, v, scale=scale, mask=mask, is_causal=True)
          return jnp.transpose(y, (0, 2, 1, 3))

        gpt2._causal_attention = attention
      if 'lora_vjp' in on:
        lora._factored = _lora_custom_vjp()
      yield
    finally:
      lora._factored = saved['fac']
      gpt2._linear, gpt2._materialize_grad, gpt2._causal_attention = saved['linear'], saved['mat'], saved['att']

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
  model_a, trainable, frozen, ids = s['model_a'], s['trainable'], s['frozen'], s['ids']
  # A separate copy for the whole-tree configurations (the split ones donate their leaves).
  params = jax.tree.map(lambda x: x.copy(), fa.combine(trainable, frozen))
  mask = s['mask']
  tx = optax.adamw(1e-4, weight_decay=0.01)
  configs = {}
  for name in args.configs:
    off = set(CHANGES) if name == 'naive' else ({name[1:]} if name.startswith('-') else set())
    on = frozenset({name[1:]}) if name.startswith('+') else frozenset()
    if 'fused_loss' in off:

      def loss_fn(p, x):
        logits = model_a.apply({'params': p}, x)
        return layers.cross_entropy(logits[:, :-1], x[:, 1:])
    else:
      loss_fn = lambda p, x: model_a.apply({'params': p}, x, method='loss')
    with _patched(off, on):
      if 'partition' in off:
        opt = fa.transfer_optimizer(tx, mask)

        def step(p, state, x, loss_fn=loss_fn, opt=opt):
          loss, g = jax.value_and_grad(loss_fn)(p, x)
          u, state = opt.update(g, state, p)
          return optax.apply_updates(p, u), state, loss

        t0 = time.perf_counter()
        compiled = jax.jit(step).lower(params, opt.init(params), ids).compile()
        configs[name] = ('whole', compiled, opt, time.perf_counter() - t0)
      else:
        t0 = time.perf_counter()
        compiled = make_train_step(loss_fn, tx).lower(trainable, tx.init(trainable), frozen, ids).compile()
        configs[name] = ('split', compiled, tx, time.perf_counter() - t0)
  # One training state per layout, threaded through every configuration of that layout (values
  # do not matter for timing; donation consumes the inputs).
  state = {'split': [trainable, tx.init(trainable)]}
  if any(c[0] == 'whole' for c in configs.values()):
    whole_opt = next(c[2] for c in configs.values() if c[0] == 'whole')
    state['whole'] = [params, whole_opt.init(params)]

  def run(name):
    kind, compiled, _, _ = configs[name]
    t = time.perf_counter()
    if kind == 'split':
      st = state['split']
      st[0], st[1], loss = compiled(st[0], st[1], frozen, ids)
    else:
      st = state['whole']
      st[0], st[1], loss = compiled(st[0], st[1], ids)
    jax.block_until_ready((st, loss))
    return time.perf_counter() - t

  for name in configs:  # warm-up
    run(name)
    run(name)
  times = {n: [] for n in configs}
  order = list(configs)
  for r in range(args.rounds):
    common.wait_quiet(max_wait=20)
    for name in order if r % 2 == 0 else order[::-1]:
      for _ in range(args.steps):
        times[name].append(run(name))
  print(json.dumps({'times': times, 'compile_s': {n: c[3] for n, c in configs.items()}}))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--mode', choices=('lora', 'full', 'both'), default='both')
  p.add_argument('--rounds', type=int, default=4)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--malloc', default='default,retain')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--weights', help=argparse.SUPPRESS)
  p.add_argument('--configs', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.size = 'quick' if args.quick else 'gpt2'
  if args.worker:
    args.configs = args.configs.split(',')
    return worker(args)

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
        # Under non-default malloc settings only `all` and `naive` run (what the settings buy).
        configs = [c for c in CONFIGS if mode == 'lora' or c != '+lora_vjp']
        if malloc != 'retain':
          configs = ['all', 'naive']
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
        result['runs'].append({'mode': mode, 'malloc': malloc, 'median_s': med, **got})
        for n, v in med.items():
          print(f'{mode:5s} malloc={malloc:7s} {n:12s} {v:7.3f} s  x{v / med["all"]:.3f} of all')
  out = os.path.join(HERE, 'results', f'ablation-{args.size}-{result["date"].replace(":", "")}.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  say(f'[ablation] wrote {out}')


if __name__ == '__main__':
  main()
