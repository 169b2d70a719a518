"""The temporal stage's training step is compiled with Eigen, not YNNPACK, on CPU; MAE keeps YNNPACK.

affect_jax.train.temporal.compiler_options (experiments/bench/RESULTS.md: 1.16x on the paper
preset's step). The option is per compiled function, so the check reads each compiled program.
"""

import jax
import jax.numpy as jnp
import pytest

from affect_jax.models import mae as mae_lib
from affect_jax.models import temporal as temporal_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import tasks
from affect_jax.train import temporal as temporal_train
from affect_jax.train import trainer
from configs import mae_pretrain, va

YNN = "__ynn_fusion"


def _temporal_step_text(compiler_options):
  config = va.get_config("size=smoke")
  model = temporal_lib.temporal_model_from_config(config.model, 2)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=2)
  mesh = trainer.make_mesh(config.mesh)
  shapes = dict(features=jax.ShapeDtypeStruct((4, config.window, 32), jnp.float32),
                frame_mask=jax.ShapeDtypeStruct((4, config.window), jnp.bool_))
  state, shardings = trainer.create_train_state(model, tx, shapes, jax.random.key(0), mesh)
  step = trainer.make_train_step(temporal_train.make_loss_fn(model, tasks.TASKS["va"]), tx,
                                 shardings, mesh, config.seed, compiler_options=compiler_options)
  batch = dict(shapes, va=jax.ShapeDtypeStruct((4, config.window, 2), jnp.float32),
               va_valid=jax.ShapeDtypeStruct((4, config.window), jnp.bool_))
  return step.lower(state, batch).compile().as_text()


def test_other_backends_keep_xla_defaults():
  if jax.default_backend() == "cpu":
    pytest.skip("the CPU backend is checked below")
  assert temporal_train.compiler_options() is None


def test_temporal_step_uses_eigen_on_cpu_and_mae_keeps_ynnpack():
  if jax.default_backend() != "cpu":
    pytest.skip("YNNPACK and Eigen are XLA CPU kernels")
  assert temporal_train.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert YNN in _temporal_step_text(None)  # XLA's default: the dots go to YNNPACK
  assert YNN not in _temporal_step_text(temporal_train.compiler_options())

  config = mae_pretrain.get_config("size=smoke")
  model = mae_lib.mae_from_config(config.model)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=2)
  mesh = trainer.make_mesh(config.mesh)
  size = config.model.image_size
  images = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
  state, shardings = trainer.create_train_state(model, tx, dict(images=images), jax.random.key(0), mesh)

  def loss_fn(params, batch_stats, batch, rngs):
    return model.apply({"params": params}, batch["images"], train=True, rngs=rngs)["loss"], ({}, batch_stats)

  step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed)
  assert YNN in step.lower(state, dict(images=images)).compile().as_text()
