"""The processor's practical matmul peak: GFLOP/s of a large jitted matmul, fp32 (bf16 with --gpu/--bf16).

`python -m benchmarks.matmul_peak jax|torch [--gpu]` prints one JSON line {size: GFLOP/s} (best of
several runs, after a warm-up). run.py takes the best over both frameworks.
"""

from __future__ import annotations

import json
import os
import sys
import time

SIZES = (2048, 4096)


def _best(fn, repeats):
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def main(framework: str, gpu: bool, bf16: bool) -> None:
  out = {}
  repeats = 20 if gpu else 5
  if framework == 'jax':
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if bf16 else jnp.float32
    f = jax.jit(lambda a, b: a @ b)
    for n in SIZES:
      a = jax.random.normal(jax.random.key(0), (n, n), dtype)
      b = jax.random.normal(jax.random.key(1), (n, n), dtype)
      f(a, b).block_until_ready()
      out[n] = 2 * n**3 / _best(lambda: f(a, b).block_until_ready(), repeats) / 1e9
  else:
    import torch

    torch.set_num_threads(os.cpu_count())
    dev = 'cuda' if gpu else 'cpu'
    dtype = torch.bfloat16 if bf16 else torch.float32
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for n in SIZES:
      a = torch.randn(n, n, dtype=dtype, device=dev)
      b = torch.randn(n, n, dtype=dtype, device=dev)
      a @ b
      sync()
      out[n] = 2 * n**3 / _best(lambda: (a @ b, sync()), repeats) / 1e9
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1], '--gpu' in sys.argv[2:], '--gpu' in sys.argv[2:] or '--bf16' in sys.argv[2:])
