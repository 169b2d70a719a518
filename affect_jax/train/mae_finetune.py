"""Fine-tuning the pre-trained encoder on Aff-Wild2 expression frames (paper §3.1).

`config.finetune_tasks` names the labels trained on: ("expr",) is the paper's recipe and the
default; adding "va" and/or "au" appends auxiliary VA (1 - CCC) and AU (BCE) outputs to the head,
each loss on the frames valid for it (validation uses the 8 EXPR outputs either way).

Starts from, in order: its own newest checkpoint in W/mae_finetune, the MAE checkpoint named by
`config.init_from`, W/mae_pretrain (running pre-training first if it has no checkpoint). Validation:
EXPR macro F1 over all 8 classes on every validation frame with a face and a valid label.
"""

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import metrics
from affect_jax import stages
from affect_jax.data import datasets
from affect_jax.data import pipelines
from affect_jax.data import schema
from affect_jax import losses
from affect_jax.models import classifier as classifier_lib
from affect_jax.models import mae as mae_lib
from affect_jax.train import mae_pretrain
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer


NUM_EXPR = len(schema.EXPR_CLASSES)
KNOWN_TASKS = ("expr", "va", "au")


def head_size(finetune_tasks):
  """EXPR outputs first (the classifier's classes), then VA and AU when trained on."""
  if "expr" not in finetune_tasks or not set(finetune_tasks) <= set(KNOWN_TASKS):
    raise ValueError(f"config.finetune_tasks={finetune_tasks}: must include 'expr', subset of "
                     f"{KNOWN_TASKS}")
  return NUM_EXPR + (2 if "va" in finetune_tasks else 0) + (12 if "au" in finetune_tasks else 0)


def finetune_loss(logits, batch, finetune_tasks, label_smoothing):
  """Sum of the tasks' losses, each over the frames valid for it."""
  if finetune_tasks == ("expr",):
    valid = jnp.ones(batch["label"].shape, bool)
    return losses.cross_entropy_loss(logits, batch["label"], valid, label_smoothing=label_smoothing)
  start = {"expr": 0, "va": NUM_EXPR, "au": NUM_EXPR + 2 if "va" in finetune_tasks else NUM_EXPR}
  total = losses.cross_entropy_loss(logits[:, :NUM_EXPR], batch["label"], batch["expr_valid"],
                                    label_smoothing=label_smoothing)
  if "va" in finetune_tasks:
    total += losses.ccc_loss(logits[:, start["va"]:start["va"] + 2], batch["va"], batch["va_valid"])
  if "au" in finetune_tasks:
    total += losses.bce_loss(logits[:, start["au"]:start["au"] + 12], batch["au"].astype(jnp.float32),
                             batch["au_valid"])
  return total


MIXUP_STREAM = 0x6d6978  # folded into the step's dropout key: mixup draws are their own stream


def mixup(batch, alpha, rng):
  """Mixup (Zhang et al. 2018): images blended with the batch in reverse order.

  Returns (images, the partner labels, lam) with lam ~ Beta(alpha, alpha), one per batch; the loss
  is lam * L(labels) + (1 - lam) * L(partner labels). alpha = 0 leaves the batch as it is.
  """
  if alpha <= 0:
    return batch["image"], batch, 1.0
  lam = jax.random.beta(rng, alpha, alpha)
  partner = jax.tree.map(lambda x: x[::-1], batch)
  images = lam * batch["image"] + (1 - lam) * partner["image"]
  return images, partner, lam


def count_expr_frames(paths, split):
  """Frames with a face and a valid EXPR label, counted on the per-video view (no pixels read)."""
  videos = datasets.open_source(paths, "affwild2/videos", split)
  return int(sum(np.sum(np.asarray(v["expr_valid"], bool) & np.asarray(v["has_face"], bool))
                 for v in videos))


def mae_abstract_state(config, mesh, batch_size):
  """The MAE stage's train state (`config.upstream`), abstract and sharded as it makes it."""
  upstream = config.upstream
  mae = mae_lib.mae_from_config(upstream.model)
  tx, _ = optimizer_lib.make_optimizer(upstream.optimizer, steps_per_epoch=1)  # structure only
  size = upstream.model.image_size
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  abstract, _, _ = trainer.abstract_train_state(mae, tx, dict(images=images), jax.random.key(0),
                                                mesh)
  return abstract


def restore_mae_encoder(config, directory, mesh, batch_size):
  """The `encoder` parameters of the newest MAE checkpoint in `directory`, sharded over `mesh`.

  Restored straight into the shardings the MAE stage uses (each process reads only its shards), so
  nothing is ever whole on one host. The checkpoint must be of `config.upstream`'s MAE.
  """
  abstract = mae_abstract_state(config, mesh, batch_size)
  return trainer.restore_upstream(config, directory, abstract).params["encoder"]


def create_state_from_mae(model, tx, init_inputs, rng, mesh, mae_encoder):
  """`trainer.create_train_state` whose jitted init copies `mae_encoder` into the parameters.

  The encoder goes into the jitted init as an argument, keeping its sharding: closed over, it
  would be baked into the program as a constant, which an array sharded over several hosts cannot
  be. The rest (head, optimiser state) is what `create_train_state(model, tx, ..., rng)` makes.
  Returns (state, state_shardings).
  """
  _, shardings, _ = trainer.abstract_train_state(model, tx, init_inputs, rng, mesh)

  def init(rng, encoder):
    def override(params, batch_stats):
      params = classifier_lib.load_mae_encoder(params, {"encoder": encoder}, model.encoder)
      return params, batch_stats
    _, _, init_fn = trainer.abstract_train_state(model, tx, init_inputs, rng, mesh,
                                                 params_override=override)
    return nn.meta.unbox(init_fn(rng))

  state = jax.jit(init, out_shardings=shardings)(rng, mae_encoder)
  return state, shardings


def train_and_evaluate(config, workdir):
  out_dir = stages.stage_dir(workdir, config.stage)
  paths = datasets.prepare(config, workdir)
  train_src = datasets.open_source(paths, "affwild2/frames", "train")
  val_src = datasets.open_source(paths, "affwild2/frames", "validation")
  mesh = trainer.make_mesh(config.mesh)
  finetune_tasks = tuple(config.finetune_tasks)
  num_classes = head_size(finetune_tasks)
  model = classifier_lib.classifier_from_config(config.model, num_classes)
  batch_size = config.optimizer.batch_size
  local_batch = batch_size // jax.process_count()
  steps_per_epoch = max(1, count_expr_frames(paths, "train") // batch_size)
  num_steps = config.num_train_steps if config.num_train_steps > 0 else int(
      round(config.optimizer.epochs * steps_per_epoch))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch, num_steps)
  size = config.model.image_size
  init_inputs = dict(images=jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32))
  rng = jax.random.key(config.seed)
  if trainer.has_checkpoint(out_dir):  # resuming: run_loop restores the state
    state, shardings = trainer.create_train_state(model, tx, init_inputs, rng, mesh)
  else:
    directory = trainer.upstream_checkpoint(config, workdir)
    state, shardings = create_state_from_mae(
        model, tx, init_inputs, rng, mesh, restore_mae_encoder(config, directory, mesh, batch_size))
    logging.info("Fine-tuning starts from the MAE encoder in %s", directory)

  def loss_fn(params, batch_stats, batch, rngs):
    mix_rng = jax.random.fold_in(rngs["dropout"], MIXUP_STREAM)
    images, mixed_with, lam = mixup(batch, config.mixup_alpha, mix_rng)
    logits = model.apply({"params": params}, images, train=True, rngs=rngs)["logits"]
    loss = finetune_loss(logits, batch, finetune_tasks, config.label_smoothing)
    if config.mixup_alpha > 0:
      loss = lam * loss + (1 - lam) * finetune_loss(logits, mixed_with, finetune_tasks,
                                                    config.label_smoothing)
    return loss, ({}, batch_stats)

  # The ViT steps' XLA options (memory-optimised scheduling on CPU; affect_jax.train.mae_pretrain).
  train_step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed,
                                       compiler_options=mae_pretrain.compiler_options())
  iterator = pipelines.finetune_frames_pipeline(
      train_src, batch_size=local_batch, image_size=size, seed=config.seed,
      class_balanced=config.class_balanced, num_workers=config.num_workers, tasks=finetune_tasks)

  replicated = trainer.replicated(mesh)

  def eval_stats(state, batch):
    logits = model.apply({"params": state.params}, batch["image"], train=False)["logits"][:, :NUM_EXPR]
    return metrics.expr_stats(logits, batch["expr"], batch["valid"] & batch["has_face"] & batch["expr_valid"])

  # One jitted function per batch with a replicated result, so every process runs the same
  # collectives in the same order (eager ops on global arrays can interleave differently).
  eval_stats_fn = jax.jit(eval_stats, in_shardings=(shardings, trainer.batch_sharding(mesh)),
                          out_shardings=replicated)
  merge_fn = jax.jit(metrics.merge, out_shardings=replicated)
  empty_fn = jax.jit(lambda: metrics.empty("expr"), out_shardings=replicated)
  writer = trainer.create_writer(out_dir)

  def evaluate(state, step):
    del step
    stats = empty_fn()
    for batch in pipelines.eval_frames_pipeline(val_src, batch_size=local_batch, image_size=size):
      device = trainer.to_global_batch(
          {k: batch[k] for k in ("image", "expr", "expr_valid", "has_face", "valid")}, mesh)
      stats = merge_fn(stats, eval_stats_fn(state, device))
    scores = metrics.compute(jax.device_get(stats))
    return {"expr_f1": scores["expr_f1"], "expr_accuracy": scores["expr_accuracy"]}

  loop = trainer.Loop(
      config=config, workdir=out_dir, state=state,
      train_step=lambda s, b: train_step(s, {k: v for k, v in b.items() if k != "record_index"}),
      train_iterator=iterator, mesh=mesh, num_train_steps=num_steps, steps_per_epoch=steps_per_epoch,
      evaluate=evaluate, eval_every_steps=config.eval_every_steps, best_metric="expr_f1",
      schedule=schedule)
  state, scores = trainer.run_loop(loop, writer)
  writer.close()
  logging.info("Fine-tuning done: %s", scores)
  return scores
