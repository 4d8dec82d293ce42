"""flax_adapters side: GPT-2 LoRA or full fine-tuning steps, merge and inference, served to run.py.

`python -m benchmarks.jax_worker --mode lora|full --size gpt2|quick --weights W.npz [--gpu]`,
then one JSON command per stdin line (see `benchmarks/common.py`). Never imports torch.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import common, setup_cfg
from benchmarks.setup_cfg import ADAMW, LORA, hf_config_dict


def build(args):
  import jax
  import jax.numpy as jnp
  import optax

  import flax_adapters as fa
  from conversion.families import get_family
  from flax_adapters.models.gpt2 import GPT2Config, GPT2LMHeadModel
  from flax_adapters.training import make_train_step

  if args.gpu and jax.devices()[0].platform != 'gpu':
    raise RuntimeError(f'--gpu, but JAX runs on {jax.devices()[0].platform}; install jax[cuda].')
  weights = dict(np.load(args.weights))
  cfg = GPT2Config(**hf_config_dict(args.size))
  # GPU mode (--bf16, implied by --gpu): bfloat16 compute; LoRA keeps a bfloat16 base and float32
  # adapters, full fine-tuning keeps float32 master weights (mixed precision), as the torch side
  # does under autocast.
  compute = jnp.bfloat16 if args.bf16 else jnp.float32
  base_dtype = jnp.bfloat16 if (args.bf16 and args.mode == 'lora') else jnp.float32
  model = GPT2LMHeadModel(cfg, dtype=compute, param_dtype=base_dtype)
  params = get_family('gpt2').torch_to_flax(
    {k: v for k, v in weights.items() if ':' not in k and k != 'input_ids'}, cfg, param_dtype=base_dtype
  )
  ids = jnp.asarray(weights['input_ids'], jnp.int32)
  lora = args.mode == 'lora'
  if lora:
    tc = fa.TransferConfig(
      mode='lora',
      lora_rank=LORA['rank'],
      lora_alpha=LORA['alpha'],
      lora_targets=LORA['targets'],
      unfreeze_norm=False,
      adapter_dtype=jnp.float32,
    )
  else:
    tc = fa.TransferConfig(mode='full')
  model_a, params = fa.prepare_for_transfer(model, params, tc, ids)
  if lora:  # start from PEFT's A matrices (B is zero on both sides)
    for i in range(cfg.n_layer):
      a = weights[f'peft:base_model.model.transformer.h.{i}.attn.c_attn.lora_A.default.weight']
      site = params['transformer'][f'h_{i}']['attn']['c_attn']
      site['lora_a'] = jnp.asarray(a.T, site['lora_a'].dtype)
  del weights
  mask = fa.trainable_mask(model_a, params)
  trainable, frozen = fa.partition(params, mask)
  del params
  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay'])

  def loss_fn(p, input_ids):
    # Same loss as HF's `model(input_ids, labels=input_ids).loss`: shifted next-token CE, mean.
    return model_a.apply({'params': p}, input_ids, method='loss')

  losses = {'main': loss_fn}
  if lora and getattr(args, 'overhead', False):
    # The library-overhead pair: the same model and params, adapted by flax_adapters ('library', the
    # benchmark's own step on a state of its own) and by a hand-written LoRA interceptor.
    scale = LORA['alpha'] / LORA['rank']
    losses.update(library=loss_fn, handwritten=handwritten_lora_loss(model, set(LORA['targets']), scale))
  steps = {fn: make_train_step(fn, tx) for fn in set(losses.values())}
  variants = {}
  for name, fn in losses.items():
    # Each variant donates its own copy of the trainable leaves; the frozen ones are shared.
    own = trainable if name == 'main' else jax.tree.map(jnp.copy, trainable)
    variants[name] = {'step': steps[fn], 'trainable': own, 'opt_state': tx.init(own)}
  return dict(jax=jax, jnp=jnp, fa=fa, model=model, model_a=model_a, frozen=frozen, ids=ids, cfg=cfg, variants=variants)


def handwritten_lora_loss(model, targets, scale):
  """The LoRA a user would write by hand for the overhead row: a linen interceptor that adds
  `scale·(x·A)·B` to each call of a module named in `targets`, reading A and B from that module's
  params (the same params tree as flax_adapters', so both variants train the same leaves)."""
  import flax.linen as nn

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.name in targets:
      p = context.module.variables['params']
      a, b = p['lora_a'].astype(y.dtype), p['lora_b'].astype(y.dtype)
      y = y + ((args[0].astype(y.dtype) @ a) * scale) @ b
    return y

  def loss(p, input_ids):
    with nn.intercept_methods(interceptor):
      return model.apply({'params': p}, input_ids, method='loss')

  return loss


class Worker:
  def __init__(self, args):
    self.args = args
    self.s = None

  def setup(self):
    t0 = time.perf_counter()
    s = self.s = build(self.args)
    jax = s['jax']
    t1 = time.perf_counter()
    out = {'build_s': t1 - t0, 'device': str(jax.devices()[0]), 'jax_version': jax.__version__}
    compiled = {}
    for v in s['variants'].values():
      t = time.perf_counter()
      if v['step'] not in compiled:  # 'library' runs the same step as 'main'
        compiled[v['step']] = v['step'].lower(v['trainable'], v['opt_state'], s['frozen'], s['ids']).compile()
      v['compiled'] = compiled[v['step']]
      cost = v['compiled'].cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out.setdefault('compile_s', time.perf_counter() - t)
      out.setdefault('xla_flops', float(cost.get('flops', float('nan'))) if cost else None)
    out['trainable_params'] = sum(int(x.size) for x in jax.tree.leaves(next(iter(s['variants'].values()))['trainable']))
    # Warm-up: the first calls (allocation, thread pools) are not timed as steps.
    # Setup (loading the shared weights file, building, compiling) and the warm-up steps have their
    # own peak. Then the allocator's free pages go back to the OS and the peak count restarts, so
    # the training peak (over the timed steps) holds what training keeps resident on each side.
    # (Per variant; 'warmup' and 'warmup_after_release' are the benchmark's own step, 'main'.)
    for name in s['variants']:
      out[f'{name}_warmup'] = self.steps(2, variant=name)
    out['setup_peak_rss_mib'] = common.peak_rss_mib()
    common.release_free_memory()
    out['hwm_reset'] = common.reset_peak_rss()
    # One more untimed step: it faults the released buffers back in (its peak counts as training).
    for name in s['variants']:
      out[f'{name}_warmup_after_release'] = self.steps(1, variant=name)
    out['warmup'], out['warmup_after_release'] = out.pop('main_warmup'), out.pop('main_warmup_after_release')
    return out

  def steps(self, n: int, variant: str | None = None):
    s = self.s
    jax = s['jax']
    v = s['variants'][variant or next(iter(s['variants']))]
    times, loads, losses, faults, dispatch = [], [], [], [], []
    for _ in range(n):
      meter = common.LoadMeter()
      f0 = common.minor_faults()
      t = time.perf_counter()
      v['trainable'], v['opt_state'], loss = v['compiled'](v['trainable'], v['opt_state'], s['frozen'], s['ids'])
      dispatch.append(time.perf_counter() - t)  # host time to launch the step (asynchronous)
      jax.block_until_ready((v['trainable'], v['opt_state'], loss))
      times.append(time.perf_counter() - t)
      loads.append(meter.others())
      faults.append(common.minor_faults() - f0)
      losses.append(float(loss))
    return {
      'times': times,
      'loads': loads,
      'losses': losses,
      'page_faults': faults,
      'dispatch_s': dispatch,
      'peak_rss_mib': common.peak_rss_mib(),
      **self._device_memory(),
    }

  def matmul(self, repeats: int = 3):
    """This framework's matmul rate in this process (GFLOP/s, best of `repeats`), to put the steps
    of the same round against their own framework's peak."""
    jax, jnp = self.s['jax'], self.s['jnp']
    if 'matmul' not in self.s:
      n = setup_cfg.MATMUL_N['gpu' if self.args.gpu else 'cpu']
      dtype = jnp.bfloat16 if self.args.bf16 else jnp.float32
      a = jax.random.normal(jax.random.key(0), (n, n), dtype)
      b = jax.random.normal(jax.random.key(1), (n, n), dtype)
      f = jax.jit(lambda a, b: a @ b)
      f(a, b).block_until_ready()
      self.s['matmul'] = (n, lambda: f(a, b).block_until_ready())
    n, run = self.s['matmul']
    return common.matmul_rate(n, run, repeats)

  def _device_memory(self):
    if not self.args.gpu:
      return {}
    stats = self.s['jax'].devices()[0].memory_stats() or {}
    return {'device_peak_mib': stats.get('peak_bytes_in_use', 0) / 2**20}

  def merge(self, repeats: int = 5):
    """Merge time of all adapters, and merged vs base vs adapted inference latency (interleaved)."""
    s = self.s
    jax, jnp, fa = s['jax'], s['jnp'], s['fa']
    params = fa.combine(next(iter(s['variants'].values()))['trainable'], s['frozen'])
    merge_times = []
    for _ in range(repeats):
      t = time.perf_counter()
      served, merged = fa.merge_adapters(s['model_a'], params)
      jax.block_until_ready(merged)
      merge_times.append(time.perf_counter() - t)
    assert served is s['model'], 'every LoRA adapter folds, so the base model serves'
    # The base params are the frozen half with the adapter leaves dropped: the unadapted model.
    base_params = _drop_adapter_leaves(params)
    forward = jax.jit(lambda p, x: s['model'].apply({'params': p}, x))
    adapted = jax.jit(lambda p, x: s['model_a'].apply({'params': p}, x))
    ids = s['ids']
    compile_t = time.perf_counter()
    forward(base_params, ids).block_until_ready()
    y_merged = forward(merged, ids).block_until_ready()
    y_adapted = adapted(params, ids).block_until_ready()
    compile_t = time.perf_counter() - compile_t
    scale = float(jnp.max(jnp.abs(y_adapted)))
    diff = float(jnp.max(jnp.abs(y_merged.astype(jnp.float32) - y_adapted.astype(jnp.float32))))
    lat = {'base': [], 'merged': [], 'adapted': []}
    for _ in range(repeats * 2):
      for name, fn, p in (('base', forward, base_params), ('merged', forward, merged), ('adapted', adapted, params)):
        t = time.perf_counter()
        fn(p, ids).block_until_ready()
        lat[name].append(time.perf_counter() - t)
    return {
      'merge_s': merge_times,
      'latency_s': lat,
      'merged_vs_adapted_max_abs': diff,
      'logit_scale': scale,
      'forward_compile_s': compile_t,
    }

  def trace(self, steps: int, out: str):
    """A jax.profiler trace (with a Perfetto JSON) of `steps` steps, for benchmarks/profile.py."""
    jax = self.s['jax']
    with jax.profiler.trace(out, create_perfetto_trace=True):
      self.steps(steps)
    return {}

  def final(self):
    return {'peak_rss_mib': common.peak_rss_mib(), **self._device_memory()}


def _drop_adapter_leaves(params):
  from flax_adapters.methods import LEAF_NAMES

  if isinstance(params, dict):
    return {k: _drop_adapter_leaves(v) for k, v in params.items() if k not in LEAF_NAMES}
  return params


def main():
  w = Worker(setup_cfg.worker_args())
  common.serve(
    {'setup': w.setup, 'steps': w.steps, 'matmul': w.matmul, 'merge': w.merge, 'trace': w.trace, 'final': w.final}
  )


if __name__ == '__main__':
  main()
