"""MAE pre-training of the ViT encoder on the face-image mixture (paper §3.1).

Sources: the face datasets found (AffectNet, RAF-DB, FER2013, FER+) and the Aff-Wild2 training
frames, mixed with `config.mixture` weights. Writes W/mae_pretrain/: checkpoints, TensorBoard
events (loss, learning rate, reconstructions of a fixed validation batch).
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import stages
from affect_jax.data import datasets
from affect_jax.data import pipelines
from affect_jax.models import mae as mae_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer

FACE_MEAN = np.asarray(pipelines.FACE_MEAN, np.float32)
FACE_STD = np.asarray(pipelines.FACE_STD, np.float32)

# XLA's CPU backend orders a program's operations for concurrency by default; its memory-optimised
# scheduler orders them to keep fewer buffers alive at once. For the MAE step it is as fast and
# holds less: ViT-B/16 at batch 8, compiled temporaries 1313 -> 1166 MiB, step time 1.06x (6
# alternated rounds, 0.98-1.16); tiny preset at batch 64, 161 -> 129 MiB, 0.97x (8 rounds,
# 0.76-1.06); the same losses. The fine-tuning step (mae_finetune.py) uses it too: ViT-B/16
# classifier at batch 8, 1773 -> 1561 MiB, 1.01x (7 rounds, 0.91-1.11); tiny at batch 64,
# 280 -> 234 MiB, 0.95x (8 rounds, 0.90-1.07) (experiments/bench/RESULTS.md). The temporal step
# gains nothing from it (3328 -> 3375 MiB), so it is these compiled steps' option, not a
# process-wide flag.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options():
  """XLA options the MAE pre-training and fine-tuning steps are compiled with on this backend
  (None: defaults)."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def make_loss_fn(model):
  """`loss_fn(params, batch_stats, batch, rngs)` of the MAE stage for `trainer.make_train_step`."""

  def loss_fn(params, batch_stats, batch, rngs):
    out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
    return out["loss"], ({}, batch_stats)

  return loss_fn


def make_train_step(model, tx, state_shardings, mesh, seed):
  """The MAE stage's jitted update, compiled with `compiler_options()`. The stage and the
  benchmarks build their step here."""
  return trainer.make_train_step(make_loss_fn(model), tx, state_shardings, mesh, seed,
                                 compiler_options=compiler_options())


def mixture_sources(config, paths):
  """{name: source} and {name: weight} of the pre-training mixture (datasets present only)."""
  sources, weights = {}, {}
  for name, weight in config.mixture.items():
    if weight <= 0:
      continue
    if name == "affwild2":
      sources[name] = datasets.open_source(paths, "affwild2/frames", "train")
    elif name in paths.face_dirs:
      sources[name] = datasets.open_source(paths, name, "train")
    else:
      continue
    weights[name] = float(weight)
  if not sources:
    raise ValueError("No pre-training data: none of the datasets in config.mixture was found.")
  logging.info("MAE mixture: %s", {k: (len(v), weights[k]) for k, v in sources.items()})
  return sources, weights


def picture_batch(paths, config):
  """A fixed batch of validation faces for the reconstruction pictures, the same on every process.

  Every process reads the first frames of the split itself (as process 0 of 1), not its share.
  """
  source = datasets.open_source(paths, "affwild2/frames", "validation")
  iterator = pipelines.eval_frames_pipeline(source, batch_size=4 * config.num_pictures,
                                            image_size=config.model.image_size, process_index=0,
                                            process_count=1)
  batch = next(iter(iterator))
  keep = np.flatnonzero(batch["has_face"] & batch["valid"])[:config.num_pictures]
  return batch["image"][keep]


def to_display(images):
  return np.clip(images * FACE_STD + FACE_MEAN, 0, 1)


def train_and_evaluate(config, workdir):
  out_dir = stages.stage_dir(workdir, config.stage)
  paths = datasets.prepare(config, workdir, faces=True)
  sources, weights = mixture_sources(config, paths)
  mesh = trainer.make_mesh(config.mesh)
  model = mae_lib.mae_from_config(config.model)
  batch_size = config.optimizer.batch_size
  local_batch = batch_size // jax.process_count()
  steps_per_epoch = max(1, sum(len(s) for s in sources.values()) // batch_size)
  num_steps = config.num_train_steps if config.num_train_steps > 0 else int(
      round(config.optimizer.epochs * steps_per_epoch))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch, num_steps)
  size = config.model.image_size
  init_inputs = dict(images=jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32))
  state, shardings = trainer.create_train_state(model, tx, init_inputs, jax.random.key(config.seed), mesh)
  logging.info("MAE: %d parameters, %d steps/epoch, %d steps", sum(
      x.size for x in jax.tree_util.tree_leaves(state.params)), steps_per_epoch, num_steps)

  train_step = make_train_step(model, tx, shardings, mesh, config.seed)
  iterator = pipelines.mae_images_pipeline(
      sources, weights=weights, batch_size=local_batch, image_size=size, seed=config.seed,
      num_workers=config.num_workers)
  pictures = picture_batch(paths, config)
  replicated = trainer.replicated(mesh)
  # The same numpy batch on every process, so the replicated global array is made from it directly.
  device_pictures = jax.make_array_from_process_local_data(replicated, pictures)

  def reconstruct(params, images):
    # A fixed mask so that pictures from different steps are comparable.
    out = model.apply({"params": params}, images, train=False, rngs={"mask": jax.random.key(0)})
    return out["loss"], mae_lib.reconstruct_images(images, out["pred"], out["mask"],
                                                   model.encoder.patch_size, model.norm_pix_loss)

  # Every process runs this one program (the same collectives); its replicated result is readable
  # on each, and process 0 writes the pictures.
  reconstruct = jax.jit(reconstruct, in_shardings=(shardings.params, replicated),
                        out_shardings=replicated)
  writer = trainer.create_writer(out_dir)

  def evaluate(state, step):
    loss, images = jax.device_get(reconstruct(state.params, device_pictures))
    if jax.process_index() == 0:
      rows = np.concatenate([to_display(pictures), to_display(images["masked"]),
                             to_display(images["pasted"])], axis=2)  # original | masked | reconstructed
      writer.write_images(step, {"reconstructions": rows})
    return {"picture_loss": float(loss)}

  loop = trainer.Loop(
      config=config, workdir=out_dir, state=state,
      train_step=lambda s, b: train_step(s, {"image": b["image"]}), train_iterator=iterator, mesh=mesh,
      num_train_steps=num_steps, steps_per_epoch=steps_per_epoch, evaluate=evaluate,
      eval_every_steps=config.eval_every_steps, schedule=schedule)
  state, scores = trainer.run_loop(loop, writer)
  writer.close()
  logging.info("MAE pre-training done: %s", scores)
  return scores
