"""Feature extraction: the fine-tuned encoder over every frame of every video (paper §3.2: f_i).

Writes the feature store W/features/: one record per video with `features [T, D]` (the CLS token)
and all labels and masks of the per-video view. Frames without a face image get the features of
the nearest frame with one (`affect_jax.data.missing_faces`), the rule every later stage shares.

Several processes: each reads its share of every split's frames and the jitted feature function
gathers each batch's features onto every device (replicated output); process 0 writes each
video's record to the store as soon as its frames are done (so one process never holds a whole
split's features), the others drop them, and all wait at a barrier until the store is written.
The store is the one a single process writes (tests/train/test_multiprocess.py).
"""

import itertools

from absl import logging
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import processes
from affect_jax import stages
from affect_jax.data import datasets
from affect_jax.data import feature_store
from affect_jax.data import missing_faces
from affect_jax.data import pipelines
from affect_jax.data import schema
from affect_jax.models import classifier as classifier_lib
from affect_jax.models import partitioning
from affect_jax.train import mae_finetune
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def finetune_abstract_params(config, mesh):
  """The fine-tuning stage's state (`config.upstream`), abstract and sharded as it makes it."""
  upstream = config.upstream
  model = classifier_lib.classifier_from_config(
      upstream.model, mae_finetune.head_size(tuple(upstream.finetune_tasks)))
  tx, _ = optimizer_lib.make_optimizer(upstream.optimizer, steps_per_epoch=1)  # structure only
  size = upstream.model.image_size
  images = jax.ShapeDtypeStruct((upstream.optimizer.batch_size, size, size, 3), jnp.float32)
  abstract, _, _ = trainer.abstract_train_state(model, tx, dict(images=images), jax.random.key(0),
                                                mesh)
  return abstract


def encoder_features(config, workdir, mesh):
  """A function (images, record_index, valid) of global batches -> the same three, replicated.

  The fine-tuned parameters are restored straight into the fine-tuning stage's shardings (each
  process reads only its shards). The jitted function takes the batch over
  `trainer.batch_sharding` and returns features, record indices and validity replicated: one
  gather inside the program, after which every process holds the whole batch's features.
  """
  model = classifier_lib.classifier_from_config(
      config.model, mae_finetune.head_size(tuple(config.upstream.finetune_tasks)))
  directory = trainer.upstream_checkpoint(config, workdir)
  abstract = finetune_abstract_params(config, mesh)
  params = trainer.restore_upstream(config, directory, abstract).params
  logging.info("Extracting features with the encoder in %s", directory)
  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract.params)
  batch_sharding = trainer.batch_sharding(mesh)
  replicated = trainer.replicated(mesh)

  def features(params, images, record_index, valid):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
        partitioning.LOGICAL_AXIS_RULES):
      feats = model.apply({"params": params}, images, train=False)["feature"]
    return feats, record_index, valid

  features = jax.jit(features, in_shardings=(param_shardings, batch_sharding, batch_sharding,
                                             batch_sharding),
                     out_shardings=(replicated, replicated, replicated))
  return lambda images, record_index, valid: features(params, images, record_index, valid)


def _batch_features(frames, config, features_fn, mesh):
  """Yields ``(record_index [n], features [n, D])`` of the valid frames of every global batch.

  Every process reads its share of ``frames`` and runs every batch (the same collectives in the
  same order); each receives the whole global batch's features.
  """
  batch_size = config.batch_size // jax.process_count()
  for batch in pipelines.eval_frames_pipeline(frames, batch_size=batch_size,
                                              image_size=config.model.image_size):
    device = trainer.to_global_batch(
        {"image": batch["image"], "record_index": batch["record_index"], "valid": batch["valid"]}, mesh)
    feats, index, valid = jax.device_get(
        features_fn(device["image"], device["record_index"], device["valid"]))
    valid = np.asarray(valid, bool)
    yield np.asarray(index)[valid], np.asarray(feats)[valid]


def run_split(paths, split, config, features_fn, mesh):
  """The batches of one split on a process that does not write the store (features dropped)."""
  for _ in _batch_features(datasets.open_source(paths, "affwild2/frames", split), config,
                           features_fn, mesh):
    pass


def extract_split(paths, split, config, features_fn, mesh):
  """Yields the split's feature-store records in video order, each once its frames are in.

  A record is the per-video view plus ``features``. Frames come in order, so with one process
  only the video being read is held: memory does not grow with the data set. With several
  processes each reads a contiguous share and a global batch mixes frames from every share, so
  process 0 holds the later shares' finished videos until the videos before them are done.
  """
  frames = datasets.open_source(paths, "affwild2/frames", split)
  videos = datasets.open_source(paths, "affwild2/videos", split)
  pending = {}  # record index -> feature row, frames of videos not yet written
  video_iter = iter(videos)
  video = next(video_iter, None)
  first = 0  # record index of `video`'s first frame
  count = frame_count = 0

  def finished():
    # From the video's last frame back: frames arrive in order, so an unfinished video costs one
    # lookup per batch instead of one per frame it has.
    return video is not None and all(first + k in pending
                                     for k in reversed(range(int(video["num_frames"]))))

  for index, feats in _batch_features(frames, config, features_fn, mesh):
    for i, row in zip(index.tolist(), feats):
      pending[i] = row
    while finished():
      n = int(video["num_frames"])
      feats = np.stack([pending.pop(first + k) for k in range(n)])
      has_face = np.asarray(video["has_face"], bool)
      record = {k: video[k] for k in schema.VIDEO_KEYS}
      record["video_id"] = _text(video["video_id"])
      record["features"] = missing_faces.fill_missing_faces(feats, has_face).astype(np.float32)
      yield record
      count, frame_count, first = count + 1, frame_count + n, first + n
      video = next(video_iter, None)
  if video is not None:
    raise ValueError(f"affwild2/videos {split}: video {_text(video['video_id'])} needs frame records "
                     f"{first}..{first + int(video['num_frames']) - 1} but affwild2/frames {split} has "
                     f"{len(frames)}: the two views disagree; rebuild the dataset.")
  if pending or first != len(frames):
    raise ValueError(f"affwild2/frames {split} has {len(frames)} records but the videos view "
                     f"accounts for {first}: the two views disagree; rebuild the dataset.")
  logging.info("Extracted %s: %d videos, %d frames", split, count, frame_count)


def write_features(paths, config, features_fn, mesh, out_dir):
  """Runs `features_fn` over every frame of every split and writes the store to `out_dir`.

  Process 0 writes; the others run the same batches and drop the features. Returns the splits.
  """
  splits = datasets.affwild2_splits(paths, "frames")
  if jax.process_index() == 0:
    # The store's writer pulls the records split by split, in this order; each is written as
    # its video's frames are done, never all features of a split at once.
    split_records = {split: extract_split(paths, split, config, features_fn, mesh)
                     for split in splits}
    first = next(split_records[splits[0]], None)  # the feature width, before the writer starts
    if first is None:
      raise ValueError(f"affwild2 split {splits[0]!r} in {paths.tfds_dir} has no videos to extract")
    split_records[splits[0]] = itertools.chain([first], split_records[splits[0]])
    feature_store.write_feature_store(out_dir, split_records, int(first["features"].shape[-1]),
                                      overwrite=True)
  else:
    for split in splits:
      run_split(paths, split, config, features_fn, mesh)
  return splits


def train_and_evaluate(config, workdir):
  out_dir = stages.stage_dir(workdir, config.stage)
  if feature_store.is_complete(out_dir):
    logging.info("Features already in %s", out_dir)
    return {}
  paths = datasets.prepare(config, workdir)
  mesh = trainer.make_mesh(config.mesh)
  splits = write_features(paths, config, encoder_features(config, workdir, mesh), mesh, out_dir)
  processes.wait_for_all("feature store written")
  logging.info("Feature store written to %s", out_dir)
  return {"videos": sum(len(datasets.open_source(paths, "affwild2/videos", split))
                        for split in splits)}
