"""Feature extraction: the fine-tuned encoder over every frame of every video (paper §3.2: f_i).

Writes the feature store W/features/: one record per video with `features [T, D]` (the CLS token)
and all labels and masks of the per-video view. Frames without a face image get the features of
the nearest frame with one (`affect_jax.data.missing_faces`), the rule every later stage shares.
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import stages
from affect_jax.data import datasets
from affect_jax.data import feature_store
from affect_jax.data import missing_faces
from affect_jax.data import pipelines
from affect_jax.data import schema
from affect_jax.models import classifier as classifier_lib
from affect_jax.train import checkpointing
from affect_jax.train import mae_finetune
from affect_jax.train import trainer


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def encoder_features(config, workdir, mesh):
  """A function images -> features, with the fine-tuned encoder's parameters loaded."""
  model = classifier_lib.classifier_from_config(
      config.model, mae_finetune.head_size(tuple(config.upstream.finetune_tasks)))
  directory = trainer.upstream_checkpoint(config, workdir)
  params = checkpointing.restore_params(directory)["params"]
  logging.info("Extracting features with the encoder in %s", directory)
  params = jax.device_put(params, trainer.replicated(mesh))

  @jax.jit
  def features(params, images):
    return model.apply({"params": params}, images, train=False)["feature"]

  return lambda images: features(params, images)


def extract_split(paths, split, config, features_fn, mesh):
  """Feature-store records of one split: the per-video view plus `features`."""
  frames = datasets.open_source(paths, "affwild2/frames", split)
  videos = datasets.open_source(paths, "affwild2/videos", split)
  batch_size = config.batch_size // jax.process_count()
  per_video = {}
  replicate = jax.jit(lambda x: x, out_shardings=trainer.replicated(mesh))
  for batch in pipelines.eval_frames_pipeline(frames, batch_size=batch_size,
                                              image_size=config.model.image_size):
    device = trainer.to_global_batch(
        {"image": batch["image"], "record_index": batch["record_index"], "valid": batch["valid"]}, mesh)
    feats = np.asarray(jax.device_get(replicate(features_fn(device["image"]))))
    index = np.asarray(jax.device_get(replicate(device["record_index"])))
    valid = np.asarray(jax.device_get(replicate(device["valid"])))
    for i in np.flatnonzero(valid):
      per_video[int(index[i])] = feats[i]
  records = []
  record_index = 0
  for video in videos:
    n = int(video["num_frames"])
    feats = np.stack([per_video[record_index + k] for k in range(n)])
    record_index += n
    has_face = np.asarray(video["has_face"], bool)
    record = {k: video[k] for k in schema.VIDEO_KEYS}
    record["video_id"] = _text(video["video_id"])
    record["features"] = missing_faces.fill_missing_faces(feats, has_face).astype(np.float32)
    records.append(record)
  if record_index != len(frames):
    raise ValueError(f"affwild2/frames {split} has {len(frames)} records but the videos view "
                     f"accounts for {record_index}: the two views disagree; rebuild the dataset.")
  return records


def train_and_evaluate(config, workdir):
  out_dir = stages.stage_dir(workdir, config.stage)
  if feature_store.is_complete(out_dir):
    logging.info("Features already in %s", out_dir)
    return {}
  paths = datasets.prepare(config, workdir)
  mesh = trainer.make_mesh(config.mesh)
  features_fn = encoder_features(config, workdir, mesh)
  splits = datasets.affwild2_splits(paths, "frames")
  split_records = {}
  for split in splits:
    split_records[split] = extract_split(paths, split, config, features_fn, mesh)
    logging.info("Extracted %s: %d videos, %d frames", split, len(split_records[split]),
                 sum(len(r["features"]) for r in split_records[split]))
  dim = int(split_records[splits[0]][0]["features"].shape[-1])
  if jax.process_index() == 0:
    feature_store.write_feature_store(out_dir, split_records, dim, overwrite=True)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices("feature store written")
  logging.info("Feature store written to %s", out_dir)
  return {"videos": sum(len(r) for r in split_records.values())}
