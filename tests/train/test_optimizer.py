"""Optimiser: schedule shape, weight-decay mask and layer-wise lr decay with known answers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from affect_jax.train import optimizer


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, weight_decay=0.1, b1=0.9, b2=0.999, schedule="cosine",
      warmup_epochs=1, epochs=10, batch_size=8, grad_clip_norm=0.0, layer_decay=1.0))
  cfg.update(kw)
  return cfg


def test_warmup_then_cosine_to_zero():
  schedule = optimizer.learning_rate_schedule(_cfg(), steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(55)), 0.5e-3, rtol=1e-5)  # half-way down the cosine
  assert float(schedule(100)) < 1e-9
  short = optimizer.learning_rate_schedule(_cfg(), steps_per_epoch=10, total_steps=40)
  assert float(short(40)) < 1e-9


def test_decay_mask_spares_biases_norms_and_tokens():
  params = {"blocks_0": {"mlp": {"fc1": {"kernel": 1, "bias": 1}}, "norm1": {"scale": 1}},
            "cls_token": 1, "pos_embed": 1, "head": {"kernel": 1}}
  mask = optimizer.decay_mask(params)
  assert mask["blocks_0"]["mlp"]["fc1"]["kernel"] and mask["head"]["kernel"]
  assert not mask["blocks_0"]["mlp"]["fc1"]["bias"] and not mask["blocks_0"]["norm1"]["scale"]
  assert not mask["cls_token"] and not mask["pos_embed"]


def test_layer_decay_scales_updates_by_depth():
  params = {"patch_embed": {"kernel": jnp.ones(2)}, "blocks_0": {"w": {"kernel": jnp.ones(2)}},
            "blocks_1": {"w": {"kernel": jnp.ones(2)}}, "head": {"kernel": jnp.ones(2)}}
  tx, _ = optimizer.make_optimizer(_cfg(layer_decay=0.5, weight_decay=0.0, schedule="constant"), 1)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  # Adam's first step is -lr * sign(g); depth 2 blocks: embed 0.5^3, block0 0.5^2, block1 0.5, head 1.
  got = {k: float(v["kernel"][0] if "kernel" in v else v["w"]["kernel"][0]) for k, v in updates.items()}
  np.testing.assert_allclose(got["head"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(got["blocks_1"], -0.5e-3, rtol=1e-4)
  np.testing.assert_allclose(got["blocks_0"], -0.25e-3, rtol=1e-4)
  np.testing.assert_allclose(got["patch_embed"], -0.125e-3, rtol=1e-4)


def test_adamw_matches_optax_reference():
  params = {"w": {"kernel": jnp.arange(4.0)}}
  grads = {"w": {"kernel": jnp.asarray([0.1, -0.2, 0.3, 0.0])}}
  tx, _ = optimizer.make_optimizer(_cfg(schedule="constant"), 1)
  ref = optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=0.1)
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(ours["w"]["kernel"], theirs["w"]["kernel"], rtol=1e-6, atol=1e-9)


def test_clipping_matches_optax_and_reuses_a_given_norm():
  grads = {"a": jnp.asarray([3.0, -4.0]), "b": {"c": jnp.asarray([[12.0]])}}  # global norm 13
  want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  clip = optimizer.clip_by_global_norm(1.0)
  computed, _ = clip.update(grads, clip.init(grads))
  given, _ = clip.update(grads, clip.init(grads), grad_norm=jnp.float32(13.0))
  for ours in (computed, given):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # The given norm is the one used (a stale or wrong norm would show here), and small norms pass.
  halved, _ = clip.update(grads, clip.init(grads), grad_norm=jnp.float32(26.0))
  np.testing.assert_allclose(halved["a"], [3.0 / 26.0, -4.0 / 26.0], rtol=1e-6)
  small = jax.tree_util.tree_map(lambda g: g / 100.0, grads)
  unchanged, _ = clip.update(small, clip.init(small))
  np.testing.assert_allclose(unchanged["b"]["c"], [[0.12]], rtol=1e-6)


def test_chained_optimizer_passes_the_norm_to_clipping():
  params = {"w": jnp.asarray([1.0, 2.0])}
  # Norm 50 (clipped to 1), then norm 0.5 (kept): Adam's second update depends on the clipping
  # of the first (its first update alone is the gradient's sign, whatever the scale).
  steps = [{"w": jnp.asarray([30.0, -40.0])}, {"w": jnp.asarray([-0.4, 0.3])}]
  tx, _ = optimizer.make_optimizer(_cfg(schedule="constant", grad_clip_norm=1.0, weight_decay=0.0), 1)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.0))
  ref_state, state = ref.init(params), tx.init(params)
  for grads in steps:
    want, ref_state = ref.update(grads, ref_state, params)
    got, state = tx.update(grads, state, params, grad_norm=optax.global_norm(grads))
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


def test_train_step_clips_as_optax_and_accepts_transformations_without_extra_args():
  """The step hands its gradient norm to our clipping; the same step with optax's clipping (which
  computes the norm itself) and with a bare GradientTransformation gives the same parameters."""
  from conftest import TinyRegressor  # pylint: disable=g-import-not-at-top
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  mesh = trainer.make_mesh((("data", -1), ("fsdp", 1), ("model", 1)))
  model = TinyRegressor(4)
  batch = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)) * 50, jnp.float32),
           "y": jnp.full((2, 2), 30.0, jnp.float32)}

  def loss_fn(params, batch_stats, batch, rngs):
    del rngs
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                               train=True, mutable=["batch_stats"])
    return jnp.mean((out - batch["y"]) ** 2), ({}, mutated["batch_stats"])

  def run(tx):
    state, shardings = trainer.create_train_state(
        model, tx, dict(x=jax.ShapeDtypeStruct((2, 3), jnp.float32)), jax.random.key(0), mesh)
    step = trainer.make_train_step(loss_fn, tx, shardings, mesh, seed=0)
    for _ in range(3):
      state, metrics = step(state, batch)
      assert float(metrics["grad_norm"]) > 10.0  # clipping is at work
    return jax.device_get(state.params)

  ours = run(optax.chain(optimizer.clip_by_global_norm(1.0), optax.sgd(0.1)))
  theirs = run(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))
  bare = optax.chain(optimizer.clip_by_global_norm(1.0), optax.sgd(0.1))
  plain = run(optax.GradientTransformation(bare.init, lambda u, s, p=None: bare.update(u, s, p)))
  for a, b, c in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs),
                     jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-7)
