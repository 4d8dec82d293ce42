"""The speed paths compute what the plain ones do: the factored LoRA gradient, the train step, the losses."""

import jax
import jax.numpy as jnp
import optax
import pytest

import flax_adapters as fa
from flax_adapters.models import layers
from flax_adapters.training import make_train_step
from tests.core import testnet as net
from tests.core.helpers import config, perturb


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _loss(model, params, x):
  return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(model.apply({'params': params}, x)))


def test_factored_lora_gradients_equal_the_folded_kernels_gradients():
  """Factored LoRA gradients (Dense, DenseGeneral, Einsum sites) against autodiff through `materialize`."""
  with jax.enable_x64(True):
    model, params, x = net.make(dtype=jnp.float64)
    adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
    p = perturb(p, jax.random.key(3))
    trainable, frozen = fa.partition(p, fa.trainable_mask(adapted, p))
    factored = jax.grad(lambda t, x: _loss(adapted, fa.combine(t, frozen), x), argnums=(0, 1))(trainable, x)
    folded = jax.grad(lambda t, x: _loss(model, fa.materialize(fa.combine(t, frozen), adapted), x), argnums=(0, 1))(
      trainable, x
    )
    assert _max_diff(factored, folded) < 1e-10


def test_make_train_step_equals_the_plain_update():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('lora'), x)
  mask = fa.trainable_mask(adapted, p)
  tx = optax.adamw(1e-2, weight_decay=0.01)
  loss_fn = lambda params, x: _loss(adapted, params, x)

  # Reference: whole-tree gradients, frozen leaves masked out by transfer_optimizer.
  opt = fa.transfer_optimizer(tx, mask)
  ref_p, ref_state = p, opt.init(p)
  trainable, frozen = fa.partition(p, mask)
  state = tx.init(trainable)
  step = make_train_step(loss_fn, tx)
  for _ in range(3):
    ref_loss, g = jax.value_and_grad(loss_fn)(ref_p, x)
    u, ref_state = opt.update(g, ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    trainable, state, loss = step(trainable, state, frozen, x)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
  assert _max_diff(fa.combine(trainable, frozen), ref_p) < 1e-5


def test_make_train_step_has_aux_and_no_jit():
  model, params, x = net.make()
  adapted, p = fa.prepare_for_transfer(model, params, config('ia3'), x)
  trainable, frozen = fa.partition(p, fa.trainable_mask(adapted, p))
  tx = optax.sgd(0.1)
  step = make_train_step(lambda q, x: (_loss(adapted, q, x), {'n': 1}), tx, has_aux=True, jit=False)
  out = step(trainable, tx.init(trainable), frozen, x)
  assert len(out) == 4 and out[3] == {'n': 1}


def test_cross_entropy_equals_optax_with_ignored_labels():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
  labels = jax.random.randint(jax.random.key(1), (3, 5), 0, 11).at[0, :2].set(-100)
  valid = labels != -100

  def ref(lg):
    per = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.sum(valid)

  a, ga = jax.value_and_grad(lambda lg: layers.cross_entropy(lg, labels))(logits)
  b, gb = jax.value_and_grad(ref)(logits)
  assert abs(float(a) - float(b)) < 1e-6 and _max_diff(ga, gb) < 1e-6


@pytest.mark.parametrize('tile', [1 << 11, 5, 13], ids=['one_tile', 'tiles_and_remainder', 'exact_tiles'])
def test_tied_head_cross_entropy_equals_the_unfused_loss(tile, monkeypatch):
  monkeypatch.setattr(layers, '_VOCAB_TILE', tile)
  h = jax.random.normal(jax.random.key(0), (2, 7, 6))
  emb = jax.random.normal(jax.random.key(1), (13, 6))
  labels = jax.random.randint(jax.random.key(2), (2, 7), 0, 13).at[1, 3].set(-100)
  ref = lambda h, e: layers.cross_entropy(h @ e.T, labels)
  fused = lambda h, e: layers.tied_head_cross_entropy(h, e, labels)
  (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(h, emb) for f in (fused, ref))
  assert abs(float(a) - float(b)) < 1e-5 and _max_diff(ga, gb) < 1e-5
  # A frozen embedding (only d/dh wanted) goes through the streamed path.
  assert _max_diff(jax.grad(fused)(h, emb), jax.grad(ref)(h, emb)) < 1e-5
  # Under a scaled cotangent the gradients scale.
  g2 = jax.grad(lambda h: 3.0 * fused(h, emb))(h)
  assert _max_diff(g2, 3.0 * jax.grad(ref)(h, emb)) < 1e-5


def test_forward_mode_autodiff_runs_through_every_adapter():
  """`jax.jvp` (and so `jacfwd`, Hessian-vector products) works through the adapted forward and
  equals the jvp through the folded model, in float64."""
  with jax.enable_x64(True):
    model, params, x = net.make(dtype=jnp.float64)
    adapted, p = fa.prepare_for_transfer(model, params, config(['lora', 'ia3']), x)
    p = perturb(p, jax.random.key(5))
    trainable, frozen = fa.partition(p, fa.trainable_mask(adapted, p))
    tangent = jax.tree.map(lambda t: jnp.ones_like(t) * 1e-2, trainable)
    _, dy = jax.jvp(lambda t: _loss(adapted, fa.combine(t, frozen), x), (trainable,), (tangent,))
    _, dy_folded = jax.jvp(
      lambda t: _loss(model, fa.materialize(fa.combine(t, frozen), adapted), x), (trainable,), (tangent,)
    )
    assert float(dy) != 0.0
    assert abs(float(dy) - float(dy_folded)) < 1e-10
