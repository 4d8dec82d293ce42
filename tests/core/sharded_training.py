"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices: LoRA training on a mesh.

Prints one JSON line: per-step losses on one device and on a (data=4, model=2) mesh, and the
shardings the adapter leaves and optimizer state ended up with.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flax_adapters as fa
from tests.core import testnet as net

STEPS = 5


def base_spec(path, leaf):
  """Megatron-style: attention heads and the MLP hidden axis split over 'model'."""
  name = '/'.join(path)
  if path[-1] == 'kernel' and any(p in name for p in ('q_proj', 'k_proj', 'v_proj')):
    return P(None, 'model', None)
  if path[-1] == 'bias' and any(p in name for p in ('q_proj', 'k_proj', 'v_proj')):
    return P('model', None)
  if name.endswith('o_proj/kernel'):
    return P('model', None, None)
  if name.endswith('fc1/kernel'):
    return P(None, 'model')
  if name.endswith('fc1/bias'):
    return P('model')
  if name.endswith('fc2/kernel'):
    return P('model', None)
  return P()


def problem():
  """The adapters both sharded runs train: the test net, a batch, targets, LoRA/IA3/Houlsby, Adam.

  Returns `(adapted, p0, tx, step, x, target)` as host (numpy) values, identical in every process.
  """
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
  p0 = jax.tree.map(np.asarray, p0)
  tx = fa.transfer_optimizer(optax.adam(1e-2), fa.trainable_mask(adapted, p0))

  def loss_fn(p, x, target):
    out = adapted.apply({'params': p}, x)
    return sum(jnp.mean((out[k] - target[k]) ** 2) for k in out)

  def step(p, s, x, target):
    loss, g = jax.value_and_grad(loss_fn)(p, x, target)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  return adapted, p0, tx, step, x, target


def train_on_one_device(device, tx, step, p0, x, target):
  """`STEPS` jitted steps on `device`: the reference losses."""
  single = jax.jit(step)
  p, s = jax.device_put(p0, device), jax.device_put(tx.init(p0), device)
  x, target = jax.device_put(x, device), jax.device_put(target, device)
  losses = []
  for _ in range(STEPS):
    p, s, loss = single(p, s, x, target)
    losses.append(float(loss))
  return losses


def train_on_mesh(adapted, tx, step, p0, x, target):
  """`STEPS` steps on a (data=4, model=2) mesh of the 8 devices (local or across processes): batch
  over 'data', heads and MLP hidden over 'model', the adapters sharded like their base kernels.

  Returns the trained params, the optimizer state and the losses.
  """
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
  losses = []
  for _ in range(STEPS):
    p, s, loss = sharded(p, s, xs, ts)
    losses.append(float(loss))
  return p, s, losses


def main():
  if jax.device_count() != 8:
    raise SystemExit('run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  adapted, p0, tx, step, x, target = problem()
  losses_1 = train_on_one_device(jax.devices()[0], tx, step, p0, x, target)
  p, s, losses_8 = train_on_mesh(adapted, tx, step, p0, x, target)

  flat = traverse_util.flatten_dict(p)
  adapter_specs = {'/'.join(k): str(v.sharding.spec) for k, v in flat.items() if k[-1] in fa.methods.LEAF_NAMES}
  # Adam's first moments, wherever the wrappers put them: every array in the state whose path ends in an adapter leaf.
  mu_specs = {}
  for path, v in jax.tree_util.tree_flatten_with_path(s)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', ''))) for k in path]
    if keys[-1] in fa.methods.LEAF_NAMES and 'mu' in keys:
      mu_specs['/'.join(keys[keys.index('mu') + 1 :])] = str(v.sharding.spec)
  print(
    json.dumps(
      {
        'devices': jax.device_count(),
        'losses_1': losses_1,
        'losses_8': losses_8,
        'adapter_specs': adapter_specs,
        'mu_specs': mu_specs,
        'n_shards_lora_b': len(flat[('blocks_0', 'mha', 'q_proj', 'lora_b')].addressable_shards),
      }
    )
  )


if __name__ == '__main__':
  main()
