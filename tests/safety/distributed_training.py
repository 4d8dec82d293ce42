"""Run twice by test_distributed.py, as process 0 and 1 of a `jax.distributed` job on this host.

Each process has four CPU devices; together they form one (data=4, model=2) mesh of eight. The
processes train LoRA/IA3/Houlsby adapters sharded like the base kernels (Megatron-style specs), save
an adapter checkpoint from both processes (then replace it, then are refused a third save without
`overwrite`), and compare the losses with the same training on one local device.

Usage: python -m tests.safety.distributed_training PROCESS_ID PORT OUT_DIR
Prints one JSON line.
"""

import json
import os
import sys

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

import flax_adapters as fa
from tests.core.sharded_training import problem, train_on_mesh, train_on_one_device


def initialize(process_id: int, port: int) -> None:
  # Multi-process CPU collectives (all-reduce etc. across the two processes) go through gloo over TCP.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_num_cpu_devices', 4)
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=process_id, initialization_timeout=120
  )


def main():
  process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  initialize(process_id, port)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  adapted, p0, tx, step, x, target = problem()
  # The same training on one device of this process: the reference; then on the global mesh over
  # both processes' devices, shardings from the base kernels.
  losses_1 = train_on_one_device(jax.local_devices()[0], tx, step, p0, x, target)
  p, _, losses_8 = train_on_mesh(adapted, tx, step, p0, x, target)

  # An adapter checkpoint from both processes; process 0 decides, writes the metadata and swaps it in.
  path = os.path.join(out, 'ckpt')
  fa.save_adapters(path, adapted, p0)
  fa.save_adapters(path, adapted, p, overwrite=True)  # replaces it atomically
  try:
    fa.save_adapters(path, adapted, p)
    refused = ''
  except FileExistsError as e:  # every process learns process 0's decision
    refused = str(e)
  # Restored in this job, onto the sharded base: the trained values come back in place.
  restored = fa.load_adapters(path, adapted, jax.tree.map(lambda v: v, p))
  same = all(
    np.array_equal(multihost_utils.process_allgather(a, tiled=True), multihost_utils.process_allgather(b, tiled=True))
    for a, b in zip(
      jax.tree.leaves(fa.checkpoint.trained_leaves(adapted, restored)),
      jax.tree.leaves(fa.checkpoint.trained_leaves(adapted, p)),
    )
  )
  trained = {
    '/'.join(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
    for k, v in traverse_util.flatten_dict(fa.checkpoint.trained_leaves(adapted, p)).items()
  }
  if process_id == 0:
    np.savez(os.path.join(out, 'trained.npz'), **trained)
  multihost_utils.sync_global_devices('done')
  flat = traverse_util.flatten_dict(p)
  print(
    json.dumps(
      {
        'process': jax.process_index(),
        'devices': jax.device_count(),
        'losses_1': losses_1,
        'losses_8': losses_8,
        'refused': refused,
        'restored_equal': bool(same),
        'lora_b_spec': str(flat[('blocks_0', 'mha', 'q_proj', 'lora_b')].sharding.spec),
        'local_shards_lora_b': len(flat[('blocks_0', 'mha', 'q_proj', 'lora_b')].addressable_shards),
      }
    ),
    flush=True,
  )
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
