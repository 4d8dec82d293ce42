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
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flax_adapters as fa
from tests.core import testnet as net
from tests.core.sharded_training import STEPS, base_spec


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
  model, params, _ = net.make()
  x = np.asarray(jax.random.normal(jax.random.key(3), (8, net.L, net.C_IN)))
  target = jax.tree.map(
    lambda o: np.asarray(jax.random.normal(jax.random.key(4), o.shape)), model.apply({'params': params}, x)
  )
  cfg = fa.TransferConfig(
    mode=['lora', 'ia3', 'houlsby'],
    lora_rank=4,
    lora_targets=['q_proj', 'v_proj', 'o_proj', 'fc1'],
    ia3_targets=['k_proj'],
    ia3_ff_targets=['fc2'],
  )
  adapted, p0 = fa.prepare_for_transfer(model, params, cfg, x)
  p0 = jax.tree.map(np.asarray, p0)  # host values, identical in both processes
  tx = fa.transfer_optimizer(optax.adam(1e-2), fa.trainable_mask(adapted, p0))

  def loss_fn(p, x, target):
    out = adapted.apply({'params': p}, x)
    return sum(jnp.mean((out[k] - target[k]) ** 2) for k in out)

  def step(p, s, x, target):
    loss, g = jax.value_and_grad(loss_fn)(p, x, target)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  # The same training on one device of this process: the reference.
  local = jax.local_devices()[0]
  single = jax.jit(step)
  p, s = jax.device_put(p0, local), jax.device_put(tx.init(p0), local)
  losses_1 = []
  for _ in range(STEPS):
    p, s, loss = single(p, s, jax.device_put(x, local), jax.device_put(target, local))
    losses_1.append(float(loss))

  # The global mesh over both processes' devices, shardings from the base kernels.
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto, AxisType.Auto))
  specs = fa.partition_specs(adapted, p0, base_spec)
  param_sh = fa.named_shardings(mesh, specs)
  state_sh = fa.optimizer_shardings(tx, p0, mesh, specs)
  data_sh = jax.sharding.NamedSharding(mesh, P('data'))
  p = fa.shard_params(p0, mesh, specs)
  s = jax.jit(tx.init, out_shardings=state_sh)(p)
  sharded = jax.jit(
    step,
    in_shardings=(param_sh, state_sh, data_sh, data_sh),
    out_shardings=(param_sh, state_sh, None),
    donate_argnums=(0, 1),
  )
  xs, ts = jax.device_put(x, data_sh), jax.device_put(target, data_sh)
  losses_8 = []
  for _ in range(STEPS):
    p, s, loss = sharded(p, s, xs, ts)
    losses_8.append(float(loss))

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
