"""A jitted training step that differentiates, updates and stores only what trains.

`make_train_step(loss_fn, tx)` returns `step(trainable, opt_state, frozen, *batch)`:

- the params arrive split by `partition` (a trainable tree and a frozen tree with `None` holes), so
  `jax.grad` differentiates the trainable part alone and XLA never computes frozen-weight gradients;
- `tx` (any optax transformation) sees the trainable tree only, so it keeps no state for frozen
  leaves;
- the trainable leaves and the optimizer state are donated: XLA updates them in place instead of
  allocating a second copy each step (for full fine-tuning that is the whole model and both Adam
  moments);
- the frozen tree is an argument, not a closure, so it is never baked into the compiled program
  as a constant.

Examples:
  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
  >>> import flax_adapters as fa
  >>> net, x = nn.Dense(2, name='q_proj'), jnp.ones((3, 4))
  >>> model, params = fa.prepare_for_transfer(net, net.init(jax.random.key(0), x)['params'],
  ...     fa.TransferConfig(mode='lora', lora_rank=1, lora_targets=['re:.*']), x)
  >>> trainable, frozen = fa.partition(params, fa.trainable_mask(model, params))
  >>> tx = optax.adam(1e-2)
  >>> opt_state = tx.init(trainable)
  >>> step = fa.make_train_step(lambda p, x: jnp.sum(model.apply({'params': p}, x) ** 2), tx)
  >>> trainable, opt_state, loss = step(trainable, opt_state, frozen, x)
  >>> sorted(k for k, v in trainable.items() if v is not None)
  ['lora_a', 'lora_b']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from flax_adapters.training import combine


def make_train_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  donate: bool = True,
  jit: bool = True,
):
  """`step(trainable, opt_state, frozen, *batch) -> (trainable, opt_state, loss[, aux])`.

  Args:
    loss_fn: `loss_fn(params, *batch)` on the whole (combined) params tree; returns the scalar
      loss, or `(loss, aux)` with `has_aux`.
    tx: the optax transformation of the trainable leaves (e.g. `optax.adamw(1e-4)`); initialise
      its state with `tx.init(trainable)`.
    has_aux: `loss_fn` returns `(loss, aux)`; the step then returns aux last.
    donate: donate `trainable` and `opt_state` to the step, so they are updated in place. Do not
      use the arrays passed in after the call (use the returned ones). `partition` shares arrays
      with the tree it splits, so the trainable leaves of that tree are consumed too: keep a copy
      (`jax.tree.map(jnp.copy, params)`) or pass `donate=False` if you need it afterwards.
    jit: return the jitted step (False: the plain function, to jit or shard yourself).

  Returns:
    The step function. `trainable` and `frozen` are the two halves of
    `flax_adapters.partition(params, mask)`; `combine(trainable, frozen)` is the whole tree.
  """

  def step(trainable, opt_state, frozen, *batch):
    def loss_of(t):
      return loss_fn(combine(t, frozen), *batch)

    out, grads = jax.value_and_grad(loss_of, has_aux=has_aux)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if has_aux:
      loss, aux = out
      return trainable, opt_state, loss, aux
    return trainable, opt_state, out

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
