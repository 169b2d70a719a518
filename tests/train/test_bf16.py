"""Mixed precision: `config.dtype="bfloat16"` computes in bf16 and keeps float32 parameters and
optimiser state; a bf16 VA run trains and scores like the float32 run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from affect_jax import stages
from affect_jax.models import mae as mae_lib
from affect_jax.models import temporal as temporal_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import tasks
from affect_jax.train import trainer
from affect_jax.data import feature_store
from conftest import FEATURE_DIM, feature_record
from configs import mae_pretrain, va

# |p_va(bf16) - p_va(float32)| on the validation videos after the same training; bf16 keeps 8
# mantissa bits; measured on this run: p_va 0.4565 (bf16) vs 0.4570 (float32).
SCORE_TOLERANCE = 0.03
EPOCHS = 8
# 8 training videos of 60 frames (windows of 30 every 20: 3 each, so 6 steps of 4 per epoch).
VIDEOS = {"train": [(f"{i}-30-640x360", 60) for i in range(1, 9)],
          "validation": [("9-30-640x360", 90), ("10-30-640x360", 70)]}


def _bf16_config(config):
  config.dtype = "bfloat16"  # model.dtype follows through its config reference
  assert config.model.dtype == "bfloat16"
  return config


def _dot_precisions(lowered_text):
  """The multiplication precision of every matrix product in a lowered StableHLO module.

  That is its operands' element type, or the type its `algorithm` names (the backward pass of
  jax.nn.dot_product_attention multiplies float32 softmax gradients as bf16 that way).
  """
  precisions = set()
  for line in lowered_text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    algorithm = re.search(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)", line)
    if algorithm:
      precisions.update(algorithm.groups())
    else:
      operands = line.rsplit(" : (", 1)[1].split(") ->")[0]
      precisions.update(t.rsplit("x", 1)[-1].rstrip(">") for t in operands.split(", "))
  return precisions


def test_bf16_state_is_float32_and_matmuls_are_bf16():
  config = _bf16_config(va.get_config("size=smoke"))
  model = temporal_lib.temporal_model_from_config(config.model, 2)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=2)
  mesh = trainer.make_mesh(config.mesh)
  shapes = dict(features=jax.ShapeDtypeStruct((4, config.window, FEATURE_DIM), jnp.float32),
                frame_mask=jax.ShapeDtypeStruct((4, config.window), jnp.bool_))
  state, shardings = trainer.create_train_state(model, tx, shapes, jax.random.key(0), mesh)
  floats = [x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state, state.batch_stats))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  task = tasks.TASKS["va"]

  def loss_fn(params, batch_stats, batch, rngs):
    outputs = model.apply({"params": params}, batch["features"], batch["frame_mask"], train=True, rngs=rngs)
    return task.loss(outputs, batch, task.valid(batch)), ({}, batch_stats)

  step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed)
  batch = dict(shapes, va=jax.ShapeDtypeStruct((4, config.window, 2), jnp.float32),
               va_valid=jax.ShapeDtypeStruct((4, config.window), jnp.bool_))
  lowered = step.lower(state, batch)
  new_state, metrics = lowered.out_info
  assert jax.tree_util.tree_map(lambda x: x.dtype, new_state) == jax.tree_util.tree_map(lambda x: x.dtype, state)
  assert metrics["loss"].dtype == jnp.float32
  # Every matrix product of the forward and backward pass multiplies in bf16; none in float32.
  assert _dot_precisions(lowered.as_text()) == {"bf16"}
  float32_model = temporal_lib.temporal_model_from_config(va.get_config("size=smoke").model, 2)
  text32 = jax.jit(lambda p, b: float32_model.apply({"params": p}, b["features"], b["frame_mask"])).lower(
      state.params, batch).as_text()
  assert _dot_precisions(text32) == {"f32"}

  # The MAE encoder and decoder too.
  mae_config = _bf16_config(mae_pretrain.get_config("size=smoke"))
  mae = mae_lib.mae_from_config(mae_config.model)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(lambda: mae.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                           jnp.zeros(images.shape)))["params"]
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  text = jax.jit(jax.grad(lambda p, x: mae.apply({"params": p}, x, rngs={"mask": jax.random.key(1)})[
      "loss"])).lower(params, images).as_text()
  assert _dot_precisions(text) == {"bf16"}


def _train_va(workdir, dtype):
  config = va.get_config("size=smoke")
  config.dtype = dtype
  config.optimizer.epochs = EPOCHS  # the learning-rate schedule spans the run
  config.optimizer.lr = 5e-3  # the smoke model learns this store within the short run
  config.eval_every_epochs = 1000  # evaluate once, at the end
  config.log_every_steps = 12
  scores = stages.run(config, str(workdir))
  events = event_accumulator.EventAccumulator(stages.output_dir(config, str(workdir)),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  losses = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("train/loss")]
  return scores, losses


def _write_local_va_store(workdir):
  """conftest's records with VA a smoothed function of the features of the frame and the 4 before
  it (learnable by the causal TCN from a window, so that a short run reaches scores worth
  comparing)."""
  seeds = iter(range(100))
  records = {}
  for split, videos in VIDEOS.items():
    records[split] = []
    for video_id, num_frames in videos:
      record = feature_record(video_id, num_frames, next(seeds))
      kernel = np.ones(5) / 5
      smooth = np.stack([np.convolve(record["features"][:, i], kernel)[:num_frames] for i in (0, 1)], -1)
      record["va"] = np.where(record["va_valid"][:, None], np.tanh(1.5 * smooth), -5.0).astype(np.float32)
      records[split].append(record)
  feature_store.write_feature_store(stages.stage_dir(str(workdir), "extract"), records, FEATURE_DIM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  results = {}
  for dtype in ("float32", "bfloat16"):
    workdir = tmp_path_factory.mktemp(dtype)
    _write_local_va_store(workdir)
    results[dtype] = _train_va(workdir, dtype)
  return results


def test_bf16_va_run_trains_and_scores_like_float32(runs):
  (scores32, losses32), (scores16, losses16) = runs["float32"], runs["bfloat16"]
  print({"float32": (scores32["p_va"], losses32), "bfloat16": (scores16["p_va"], losses16)})
  assert len(losses16) == EPOCHS * 6 // 12
  # Each logged loss is the mean over 12 steps; the CCC loss (1 - CCC) falls clearly.
  assert losses16[-1] < 0.7 * losses16[0], losses16
  assert scores32["p_va"] > 0.3  # the float32 run learned something for bf16 to be compared with
  assert abs(scores16["p_va"] - scores32["p_va"]) <= SCORE_TOLERANCE, (scores16, scores32)
  for name in ("ccc_valence", "ccc_arousal"):
    assert abs(scores16[name] - scores32[name]) <= SCORE_TOLERANCE, (name, scores16, scores32)
