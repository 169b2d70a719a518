"""The temporal stage (VA, EXPR, AU): TCN -> Transformer -> per-frame head on feature windows.

Reads the feature store (running the extraction stage first when W/features is missing), trains
on windows of `config.window` frames every `config.stride` frames, and scores the validation
videos as the challenge does: windows merged back to one prediction per frame (each frame from
the window where it is most central), every frame of every video, invalid labels excluded.

Writes into W/<task>/ (W/<task>_fold<K> for folds 1..4): checkpoints/, TensorBoard events, scores.json, and per-frame predictions in
the challenge submission format (predictions/validation.txt, and predictions/test.txt when the
dataset lists test videos).
"""

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import evaluation
from affect_jax import metrics
from affect_jax import stages
from affect_jax.data import feature_store
from affect_jax.data import folds
from affect_jax.data import pipelines
from affect_jax.data import segments
from affect_jax.models import temporal as temporal_models
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import tasks
from affect_jax.train import trainer

MODEL_KEYS = ("features", "frame_mask", "va", "va_valid", "expr", "expr_valid", "au", "au_valid")

# XLA's CPU backend hands matmuls, convolutions and reductions to YNNPACK by default. For this
# model's training step, matmuls and convolutions on Eigen with reductions on YNNPACK are fastest:
# against Eigen for everything (the option before, itself 1.16x XLA's default on an Intel Xeon),
# 1.14x on the paper preset (32 x 300 x 768) and 1.06x on the tiny preset (against XLA's default
# 1.08x and 1.04x), A/Bs of the same step in one process on an AMD EPYC
# (experiments/bench/RESULTS.md). XLA's own reductions, which Eigen
# alone leaves, are slow tree reductions (reduce-window) on CPU. The MAE steps stay on XLA's
# default (all YNNPACK), so the option is set for this compiled step only, not process-wide
# through XLA_FLAGS.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options():
  """XLA options the temporal training step is compiled with on this backend (None: defaults)."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def _video_id(record):
  value = record["video_id"]
  return value.decode() if isinstance(value, bytes) else str(value)


def ensure_features(config, workdir):
  """The feature store folder, extracting features first if it is not complete."""
  features_dir = stages.stage_dir(workdir, "extract")
  if not feature_store.is_complete(features_dir):
    logging.info("No features in %s yet: running the extraction stage first.", features_dir)
    stages.run(config.upstream, workdir)
  else:
    logging.info("Reusing features in %s", features_dir)
  return features_dir


def fold_sources(config, features_dir, task):
  """(train, validation, test or None) sources of the videos labelled for `task` in this fold."""
  splits, labelled = {}, {}
  for split in ("train", "validation"):
    source = feature_store.open_feature_store(features_dir, split)
    splits[split] = source
    # One pass over the records (each read carries the features): id and task flag together.
    labelled[split] = [(i, _video_id(r)) for i, r in enumerate(source) if bool(r[f"labels_{task}"])]
  train_ids = [vid for _, vid in labelled["train"]]
  val_ids = [vid for _, vid in labelled["validation"]]
  fold_train, fold_val = folds.fold_videos(train_ids, val_ids, config.fold, config.num_folds, config.seed)
  where = {vid: (split, i) for split in labelled for i, vid in labelled[split]}

  def subset(ids):
    # Both official splits may contribute to a fold; chain them as one source.
    records = [(where[vid][0], where[vid][1]) for vid in sorted(ids)]
    return _ChainedSource(splits, records)

  test = None
  try:
    test = feature_store.open_feature_store(features_dir, "test")
  except (KeyError, ValueError, FileNotFoundError):
    pass
  return subset(fold_train), subset(fold_val), test


class _ChainedSource:

  def __init__(self, sources, records):
    self.sources = sources
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    split, i = self.records[index]
    return self.sources[split][i]


def _model_inputs(batch):
  """The arrays the step uses (already global jax.Arrays: no host round trip here)."""
  return {k: batch[k] for k in MODEL_KEYS}


def make_loss_fn(model, task):
  """`loss_fn(params, batch_stats, batch, rngs)` of the temporal stage for `trainer.make_train_step`."""

  def loss_fn(params, batch_stats, batch, rngs):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    outputs, mutated = model.apply(variables, batch["features"], batch["frame_mask"], train=True,
                                   rngs=rngs, mutable=["batch_stats"])
    loss = task.loss(outputs.astype(jnp.float32), batch, task.valid(batch))
    return loss, ({}, mutated.get("batch_stats", batch_stats))

  return loss_fn


def make_train_step(model, task, tx, state_shardings, mesh, seed):
  """The temporal stage's jitted update: `make_loss_fn` in `trainer.make_train_step`, compiled
  with `compiler_options()`. The stage and the benchmarks build their step here."""
  return trainer.make_train_step(make_loss_fn(model, task), tx, state_shardings, mesh, seed,
                                 compiler_options=compiler_options())


def train_and_evaluate(config, workdir):
  """Trains the temporal model for config.task and writes its validation scores."""
  task = tasks.TASKS[config.task]
  out_dir = stages.output_dir(config, workdir)
  os.makedirs(out_dir, exist_ok=True)
  features_dir = ensure_features(config, workdir)
  train_src, val_src, test_src = fold_sources(config, features_dir, config.task)
  if len(train_src) == 0 or len(val_src) == 0:
    raise ValueError(f"Fold {config.fold} of task {config.task} has {len(train_src)} training and "
                     f"{len(val_src)} validation videos in {features_dir}; both must be non-empty.")
  logging.info("Task %s fold %d: %d training and %d validation videos", config.task, config.fold,
               len(train_src), len(val_src))

  mesh = trainer.make_mesh(config.mesh)
  dtype = trainer.compute_dtype(config)
  model = temporal_models.temporal_model_from_config(config.model, task.num_outputs)
  batch_size = config.optimizer.batch_size
  if batch_size % jax.process_count():
    raise ValueError(f"Batch {batch_size} not divisible by {jax.process_count()} processes")
  local_batch = batch_size // jax.process_count()
  train_lengths = pipelines.video_lengths(train_src)
  num_windows = len(pipelines.segment_table(train_lengths, config.window, config.stride))
  steps_per_epoch = max(1, num_windows // batch_size)
  num_steps = config.num_train_steps if config.num_train_steps > 0 else int(
      round(config.optimizer.epochs * steps_per_epoch))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch, num_steps)
  feature_dim = feature_store.feature_dim(features_dir)
  init_inputs = dict(
      features=jax.ShapeDtypeStruct((batch_size, config.window, feature_dim), jnp.float32),
      frame_mask=jax.ShapeDtypeStruct((batch_size, config.window), jnp.bool_))
  state, state_shardings = trainer.create_train_state(
      model, tx, init_inputs, jax.random.key(config.seed), mesh)
  logging.info("Temporal model for %s: %d parameters; %d windows, %d steps/epoch, %d steps",
               config.task, sum(x.size for x in jax.tree_util.tree_leaves(state.params)), num_windows,
               steps_per_epoch, num_steps)

  train_step = make_train_step(model, task, tx, state_shardings, mesh, config.seed)

  def predict(state, batch):
    variables = {"params": state.params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    return model.apply(variables, batch["features"], batch["frame_mask"], train=False).astype(jnp.float32)

  predict_fn = jax.jit(predict, in_shardings=(state_shardings, trainer.batch_sharding(mesh)),
                       out_shardings=trainer.replicated(mesh))
  jitter = config.stride // 2 if config.jitter else 0
  train_iter = pipelines.train_segments_pipeline(
      train_src, batch_size=local_batch, window=config.window, stride=config.stride, jitter=jitter,
      seed=config.seed, num_frames=train_lengths, num_workers=config.num_workers)
  writer = trainer.create_writer(out_dir)
  scorer = Scorer(config, task, model_dtype=dtype, predict_fn=predict_fn, mesh=mesh,
                  local_batch=local_batch, out_dir=out_dir)

  def evaluate(state, step):
    return scorer.evaluate(state, step, val_src, writer)

  loop = trainer.Loop(
      config=config, workdir=out_dir, state=state,
      train_step=lambda s, b: train_step(s, _model_inputs(b)),
      train_iterator=train_iter, mesh=mesh, num_train_steps=num_steps, steps_per_epoch=steps_per_epoch,
      evaluate=evaluate, eval_every_steps=config.eval_every_epochs * steps_per_epoch,
      best_metric=task.main_metric, schedule=schedule)
  state, scores = trainer.run_loop(loop, writer)
  if not scores:
    scores = evaluate(state, int(jax.device_get(state.step)))
  if test_src is not None and len(test_src):
    scorer.write_test_predictions(state, test_src, scores)
  writer.close()
  _print_summary(config, out_dir, scores)
  return scores


class Scorer:
  """Predicts every frame of a set of videos and scores them under the challenge protocol."""

  def __init__(self, config, task, *, model_dtype, predict_fn, mesh, local_batch, out_dir):
    self.config = config
    self.task = task
    self.dtype = model_dtype
    self.predict_fn = predict_fn
    self.mesh = mesh
    self.local_batch = local_batch
    self.out_dir = out_dir

  def predict_videos(self, state, source):
    """{video index: raw outputs [T, K]} for every video of `source`."""
    lengths = pipelines.video_lengths(source)
    iterator = pipelines.eval_segments_pipeline(
        source, batch_size=self.local_batch, window=self.config.window, stride=self.config.stride,
        num_frames=lengths)
    collected = {k: [] for k in ("video_index", "start", "segment_valid", "frame_mask", "preds")}
    for batch in iterator:
      device_batch = trainer.to_global_batch(
          {"features": np.asarray(batch["features"], np.float32), "frame_mask": batch["frame_mask"],
           "video_index": batch["video_index"], "start": batch["start"],
           "segment_valid": batch["segment_valid"]}, self.mesh)
      preds = jax.device_get(self.predict_fn(state, device_batch))
      meta = jax.device_get(jax.jit(lambda b: b, out_shardings=trainer.replicated(self.mesh))(
          {k: device_batch[k] for k in ("video_index", "start", "segment_valid", "frame_mask")}))
      for key, value in meta.items():
        collected[key].append(np.asarray(value))
      collected["preds"].append(np.asarray(preds))
    merged = segments.merge_batched_segments(
        *(np.concatenate(collected[k]) for k in ("video_index", "start", "segment_valid", "preds",
                                                  "frame_mask")),
        num_frames={i: int(n) for i, n in enumerate(lengths)})
    return merged

  def evaluate(self, state, step, source, writer):
    task = self.task
    merged = self.predict_videos(state, source)
    records = [source[i] for i in range(len(source))]
    outputs = np.concatenate([merged[i] for i in range(len(records))])
    if task.name == "va":
      outputs = np.clip(outputs, -1.0, 1.0)  # score exactly what the submission file holds
    labels = np.concatenate([np.asarray(r[task.label_key]) for r in records])
    valid = np.concatenate([np.asarray(r[f"{task.label_key}_valid"], bool) for r in records])
    stats = task.stats(jnp.asarray(outputs), jnp.asarray(labels), jnp.asarray(valid))
    scores = metrics.compute(stats)
    if task.name == "au":
      thresholds, _, tuned_f1 = stats.tune_thresholds()
      scores["au_f1_tuned"] = float(tuned_f1)
      scores["au_tuned_thresholds"] = [float(t) for t in thresholds]
    scores["step"] = int(step)
    self._write_outputs(step, records, merged, scores, writer)
    scalars = {k: v for k, v in scores.items() if np.isscalar(v)}
    logging.info("Validation %s at step %d: %s", task.name, step,
                 {k: round(v, 4) for k, v in scalars.items() if not k.startswith(("au_f1_AU", "expr_f1_"))})
    return scalars

  def _postprocess(self, outputs):
    # Submissions use the protocol's threshold; tuned thresholds are only reported as au_f1_tuned.
    return evaluation.postprocess(
        self.task.name, outputs, au_thresholds=self.config.au_threshold,
        expr_smoothing_frames=self.config.expr_smoothing_frames)

  def _write_outputs(self, step, records, merged, scores, writer):
    if jax.process_index() != 0:
      return
    task = self.task
    videos = [(_video_id(r), self._postprocess(merged[i])) for i, r in enumerate(records)]
    evaluation.write_submission(os.path.join(self.out_dir, "predictions", "validation.txt"), task.name, videos)
    history_path = os.path.join(self.out_dir, "scores.json")
    history = {}
    if os.path.exists(history_path):
      with open(history_path) as f:
        history = json.load(f)
    history.setdefault("history", []).append(scores)
    history["latest"] = scores
    best = history.get("best")
    if best is None or scores[task.main_metric] >= best[task.main_metric]:
      history["best"] = scores
    history.update(task=task.name, fold=self.config.fold, metric=task.main_metric,
                   protocol="per frame over all validation frames concatenated; invalid labels excluded")
    with open(history_path + ".tmp", "w") as f:
      json.dump(history, f, indent=1)
    os.replace(history_path + ".tmp", history_path)
    images = {}
    if task.name == "va":
      for i, record in enumerate(records[:self.config.num_timeline_videos]):
        images[f"va_timeline/{_video_id(record)}"] = evaluation.va_timeline_image(
            _video_id(record), np.asarray(record["va"]), np.asarray(record["va_valid"], bool),
            np.clip(merged[i], -1, 1))[None]
    elif task.name == "expr":
      truth = np.concatenate([np.asarray(r["expr"]) for r in records])
      valid = np.concatenate([np.asarray(r["expr_valid"], bool) for r in records])
      pred = np.concatenate([merged[i].argmax(-1) for i in range(len(records))])
      confusion = np.zeros((8, 8), np.int64)
      np.add.at(confusion, (truth[valid], pred[valid]), 1)
      images["expr_confusion"] = evaluation.confusion_image(confusion)[None]
    if images:
      writer.write_images(step, images)

  def write_test_predictions(self, state, source, scores):
    merged = self.predict_videos(state, source)  # every process takes part in the computation
    if jax.process_index() != 0:
      return
    videos = [(_video_id(source[i]), self._postprocess(merged[i])) for i in range(len(source))]
    path = os.path.join(self.out_dir, "predictions", "test.txt")
    evaluation.write_submission(path, self.task.name, videos)
    logging.info("Wrote test-set predictions for %d videos to %s", len(videos), path)


def _print_summary(config, out_dir, scores):
  if jax.process_index() != 0:
    return
  lines = [f"Validation scores ({config.task}, fold {config.fold}):"]
  lines += [f"  {k} = {v:.4f}" for k, v in scores.items()
            if k in ("p_va", "ccc_valence", "ccc_arousal", "expr_f1", "expr_accuracy", "au_f1", "au_f1_tuned")]
  lines += [f"TensorBoard logs: {out_dir}  (tensorboard --logdir {out_dir})",
            f"Checkpoints:      {os.path.join(out_dir, 'checkpoints')}",
            f"Scores:           {os.path.join(out_dir, 'scores.json')}",
            f"Predictions:      {os.path.join(out_dir, 'predictions')}",
            "Plots:            in TensorBoard's Images tab"]
  print("\n".join(lines), flush=True)
