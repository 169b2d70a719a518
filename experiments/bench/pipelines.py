r"""Figure 4: input pipelines vs the rate their training step consumes.

  python -m experiments.bench.pipelines [--quick] [--workers=0,1,2] [--image_size=224] [--batch_size=64]

MAE images/s: experiments/bench_loader.py's measurement (synthetic 112px JPEG faces through
`pipelines.mae_images_pipeline`: decode, random resized crop, flip, normalise; its flags
--image_size, --batch_size, --num_batches, --read_threads apply). Temporal segments/s:
`pipelines.train_segments_pipeline` over a synthetic feature store written with
`feature_store.write_feature_store` (--videos videos of --frames frames of 768 features; windows of
300 every 200 frames, batch 32, shuffled, as the paper preset). Each is timed with 0, 1 and 2
Grain worker processes (mp_prefetch).

The consumption rates are our steps' throughputs from this run's mae_step_B and temporal_step
summaries (--summary_dir) when present, else measured here (3 calls after warm-up). The pipeline
and the step are timed apart: in training they share the same cores.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from experiments import bench_loader
from experiments.bench import harness
from affect_jax.data import feature_store
from affect_jax.data import pipelines
from affect_jax.data import schema

VIDEOS = flags.DEFINE_integer("videos", 24, "Synthetic videos in the feature store.")
FRAMES = flags.DEFINE_integer("frames", 1500, "Frames per synthetic video.")
SEGMENT_BATCHES = flags.DEFINE_integer("segment_batches", 20, "Timed temporal batches per setting.")
FEATURE_DIM = 768


def feature_record(index, num_frames, rng):
  """One feature-store record (schema.FEATURE_KEYS) of random features and labels."""
  record = {
      "video_id": f"{index}-30-640x360", "num_frames": num_frames,
      "has_face": np.ones(num_frames, bool),
      "va": rng.uniform(-1, 1, (num_frames, 2)).astype(np.float32), "va_valid": np.ones(num_frames, bool),
      "expr": rng.integers(0, 8, num_frames).astype(np.int32), "expr_valid": np.ones(num_frames, bool),
      "au": rng.integers(0, 2, (num_frames, 12)).astype(np.int32), "au_valid": np.ones(num_frames, bool),
      "labels_va": True, "labels_expr": True, "labels_au": True,
      "features": rng.normal(size=(num_frames, FEATURE_DIM)).astype(np.float32),
  }
  assert set(record) == set(schema.FEATURE_KEYS), sorted(set(schema.FEATURE_KEYS) ^ set(record))
  return record


def write_store(directory, videos, frames, seed=0):
  rng = np.random.default_rng(seed)
  feature_store.write_feature_store(
      directory, {"train": (feature_record(i, frames, rng) for i in range(videos))}, FEATURE_DIM)
  return feature_store.open_feature_store(directory, "train")


def segments_per_second(source, workers, batch, window, num_batches, warmup=3):
  iterator = pipelines.train_segments_pipeline(
      source, batch_size=batch, window=window, stride=window * 2 // 3, seed=0, num_workers=workers)
  try:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      out = next(iterator)
    elapsed = time.perf_counter() - start
    assert out["features"].shape == (batch, window, FEATURE_DIM)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  return num_batches * batch / elapsed


def step_rate(figure, build):
  """Items/s of our step: from this run's summary, else 3 calls timed here."""
  summary = harness.read_summary(figure)
  if summary is not None and summary["quick"] == harness.QUICK.value:
    return summary["rows"][0]["rate"], f"{figure} figure of this run"
  call, items = build()
  call()
  call()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return items / float(np.median(times)), "measured here (median of 3 calls)"


def main(argv):
  del argv
  quick = harness.QUICK.value
  if quick:
    flags.FLAGS.image_size, flags.FLAGS.batch_size, flags.FLAGS.num_batches = 64, 8, 4
    flags.FLAGS.num_images, flags.FLAGS.warmup_batches = 64, 1
  workers = [int(w) for w in flags.FLAGS.workers]
  records = bench_loader.synthetic_faces(flags.FLAGS.num_images, flags.FLAGS.source_size)

  def mae_build():
    from experiments.bench import mae_step  # pylint: disable=g-import-not-at-top
    config, batch = mae_step.preset_config("tiny" if quick else "B")
    return mae_step.make_ours(config, batch)[0], batch

  def temporal_build():
    from experiments.bench import temporal_step  # pylint: disable=g-import-not-at-top
    batch, window = temporal_step.sizes()
    return temporal_step.make_ours(temporal_step.paper_config(),
                                   temporal_step.synthetic_batch(batch, window))[0], batch

  mae_step_rate, mae_from = step_rate("mae_step_tiny" if quick else "mae_step_B", mae_build)
  temporal_rate, temporal_from = step_rate("temporal_step", temporal_build)

  rows = []
  image_size = flags.FLAGS.image_size
  for w in workers:
    rate = bench_loader.images_per_second(records, w)
    rows.append(f"| MAE images ({image_size}x{image_size}, batch {flags.FLAGS.batch_size}) | {w} | "
                f"{rate:.0f} images/s | {mae_step_rate:.2f} images/s | **{rate / mae_step_rate:.0f}x** |")
    print(rows[-1], flush=True)
  videos, frames, batch, window = (4, 400, 4, 60) if quick else (VIDEOS.value, FRAMES.value, 32, 300)
  with tempfile.TemporaryDirectory() as tmp:
    source = write_store(tmp, videos, frames)
    for w in workers:
      rate = segments_per_second(source, w, batch, window, 3 if quick else SEGMENT_BATCHES.value)
      rows.append(f"| temporal segments ({window} x {FEATURE_DIM}, batch {batch}) | {w} | {rate:.0f} segments/s | "
                  f"{temporal_rate:.2f} segments/s | **{rate / temporal_rate:.0f}x** |")
      print(rows[-1], flush=True)
  text = harness.header(
      "Input pipelines vs the rate the training step consumes",
      f"MAE: {flags.FLAGS.num_images} synthetic {flags.FLAGS.source_size}px JPEGs, "
      f"{flags.FLAGS.num_batches} timed batches, read_threads={flags.FLAGS.read_threads}; temporal: "
      f"{videos} videos x {frames} frames in a feature store on local disk; step rates: MAE "
      f"{mae_from}, temporal {temporal_from}") + "\n".join([
          "| pipeline | Grain workers | pipeline rate | our step consumes | pipeline ÷ step |",
          "|---|---|---|---|---|", *rows]) + "\n"
  harness.append_text(text)
  harness.write_summary("pipelines", dict(rows=rows, quick=quick))


if __name__ == "__main__":
  app.run(main)
