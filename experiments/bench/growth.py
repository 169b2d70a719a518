r"""Figure 6: how cost grows: temporal epoch time and peak memory for 10, 40, 160 videos; feature
extraction time for 1x, 4x, 16x frames.

  python -m experiments.bench.growth [--quick] [--videos=10,40,160] [--frames_per_video=600]
      [--extract_frames=1024] [--temporal_size=tiny]

Temporal: a synthetic feature store (768-d features, --frames_per_video frames per video, as
experiments/bench/pipelines.py writes it), then one epoch of the temporal stage's training at the
--temporal_size preset of configs/va.py (tiny: batch 8, windows of 300 every 200 frames): Grain's
`train_segments_pipeline` feeding the stage's `temporal.make_train_step`, steps_per_epoch = windows // batch as
train/temporal.py computes it, each step's metrics fetched before the next batch as the stage's loop
(trainer.run_loop) does. The epoch is timed after one warm-up step (compilation). Each size
trains in its own process on a store that another process wrote before (so the writer's buffers
are not counted); the trainer's peak RSS (VmHWM, whole process, compilation included: every row
compiles for itself, JAX's compilation cache off) is the memory, and the writer's peak is reported
beside it.

Extraction: the extract stage's work (`extract.write_features`: `pipelines.eval_frames_pipeline`
-> jitted encoder -> each video's record streamed into the feature store) with the tiny preset's
encoder (64x64, configs/extract.py:size=tiny, freshly initialised) over the synthetic face videos
(8 videos, all splits) of about 1x, 4x, 16x --extract_frames frames, made by another process and
timed after a warm-up batch; peak RSS as for the temporal rows.
--quick: 2, 4, 8 videos of 400 frames; 240 frames.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from experiments.bench import pipelines as bench_pipelines
from affect_jax.data import datasets
from affect_jax.data import feature_store
from affect_jax.data import pipelines
from affect_jax.models import classifier as classifier_lib
from affect_jax.models import temporal as temporal_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import extract as extract_stage
from affect_jax.train import tasks
from affect_jax.train import temporal as temporal_train
from affect_jax.train import trainer
from configs import extract
from configs import va

VIDEO_COUNTS = flags.DEFINE_list("video_counts", ["10", "40", "160"], "Data-set sizes (videos).")
FRAMES_PER_VIDEO = flags.DEFINE_integer("frames_per_video", 600, "Frames per synthetic video.")
EXTRACT_FRAMES = flags.DEFINE_integer("extract_frames", 1024, "Frames at 1x for extraction.")
TEMPORAL_SIZE = flags.DEFINE_enum("temporal_size", "tiny", ["smoke", "tiny", "paper"],
                                  "configs/va.py size of the temporal model.")
GROWTH_CHILD = flags.DEFINE_string("growth_child", None,
                                   "Internal: 'store:N:DIR', 'temporal:N:DIR', 'videos:N:DIR' or 'extract:N:DIR'.")


def temporal_epoch(store_dir, size):
  """(seconds for one epoch, steps, windows) of the temporal stage over the store in store_dir."""
  config = va.get_config(f"size={size}")
  task = tasks.TASKS["va"]
  source = feature_store.open_feature_store(store_dir, "train")
  lengths = pipelines.video_lengths(source)
  num_windows = len(pipelines.segment_table(lengths, config.window, config.stride))
  batch = config.optimizer.batch_size
  steps = max(1, num_windows // batch)
  model = temporal_lib.temporal_model_from_config(config.model, task.num_outputs)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps)
  mesh = trainer.make_mesh(config.mesh, jax.devices()[:1])
  init_inputs = dict(
      features=jax.ShapeDtypeStruct((batch, config.window, bench_pipelines.FEATURE_DIM), jnp.float32),
      frame_mask=jax.ShapeDtypeStruct((batch, config.window), jnp.bool_))
  state, shardings = trainer.create_train_state(model, tx, init_inputs, jax.random.key(0), mesh)

  step = temporal_train.make_train_step(model, task, tx, shardings, mesh, config.seed)
  iterator = pipelines.train_segments_pipeline(
      source, batch_size=batch, window=config.window, stride=config.stride,
      jitter=config.stride // 2 if config.jitter else 0, seed=0, num_frames=lengths,
      num_workers=config.num_workers)
  keys = ("features", "frame_mask", "va", "va_valid")

  def one_step(state):
    local = next(iterator)
    state, metrics = step(state, trainer.to_global_batch({k: local[k] for k in keys}, mesh))
    # As trainer.run_loop: the step's metrics come to the host before the next batch is sent.
    # Without this the loop would run ahead of the device and hold every dispatched step's
    # batch at once (an epoch's worth: +270 MiB at 160 videos), which the stage never does.
    return state, jax.device_get(metrics)

  state, _ = one_step(state)  # compiles
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = one_step(state)
  return time.perf_counter() - start, steps, num_windows


def extraction_config(num_frames, data_dir):
  """configs/extract.py:size=tiny over 8 synthetic videos of num_frames / 8 frames each, in data_dir."""
  config = extract.get_config("size=tiny")
  config.data.root = data_dir
  config.data.synthetic.update(videos=8, frames=max(30, num_frames // 8), face_images=0)
  return config


def extraction(num_frames, data_dir):
  """(seconds, frames) of the extract stage's work (`extract.write_features`: frames pipeline ->
  jitted tiny encoder -> records streamed into the feature store) over every split of the
  synthetic videos in data_dir, after a warm-up batch. The encoder is freshly initialised (the
  stage restores a fine-tuned one; the work is the same)."""
  config = extraction_config(num_frames, data_dir)
  paths = datasets.prepare(config, data_dir)
  model = classifier_lib.classifier_from_config(config.model, 1)
  mesh = trainer.make_mesh(config.mesh, jax.devices()[:1])
  size = config.model.image_size
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))()
  params = jax.device_put(params["params"], trainer.replicated(mesh))

  @jax.jit
  def features(params, images, record_index, valid):  # as train/extract.py's encoder_features
    return model.apply({"params": params}, images, train=False)["feature"], record_index, valid

  features_fn = lambda *batch: features(params, *batch)
  batch = config.batch_size
  jax.block_until_ready(features_fn(jnp.zeros((batch, size, size, 3)), jnp.zeros((batch,), jnp.int64),
                                    jnp.zeros((batch,), bool)))  # compiles
  start = time.perf_counter()
  splits = extract_stage.write_features(paths, config, features_fn, mesh, os.path.join(data_dir, "features"))
  seconds = time.perf_counter() - start
  return seconds, sum(len(datasets.open_source(paths, "affwild2/frames", s)) for s in splits)


def child(spec):
  kind, n, store_dir = (spec.split(":") + [""])[:3]
  n = int(n)
  frames = 400 if harness.QUICK.value else FRAMES_PER_VIDEO.value
  if kind == "store":
    bench_pipelines.write_store(store_dir, n, frames)
    out = {}
  elif kind == "temporal":
    seconds, steps, windows = temporal_epoch(store_dir, "smoke" if harness.QUICK.value else TEMPORAL_SIZE.value)
    out = dict(seconds=seconds, steps=steps, windows=windows)
  elif kind == "videos":
    datasets.prepare(extraction_config(n, store_dir), store_dir)
    out = {}
  else:
    seconds, frames = extraction(n, store_dir)
    out = dict(seconds=seconds, frames=frames)
  with open("/proc/self/status") as f:
    status = {line.split(":")[0]: line.split()[1:] for line in f}
  out["peak_mib"] = int(status["VmHWM"][0]) / 1024
  # Resident now, split: anonymous (heap) vs file-backed (mapped files, e.g. the store's pages).
  out["anon_mib"] = int(status["RssAnon"][0]) / 1024
  out["file_mib"] = int(status["RssFile"][0]) / 1024
  print("GROWTH " + json.dumps(out), flush=True)


def run_child(spec):
  args = [a for a in sys.argv[1:] if not a.startswith("--growth_child")]
  # Every row compiles its programs itself (JAX's compilation cache off), so that the rows differ
  # only in the data: with the cache, the first row would compile and the later ones load.
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  proc = subprocess.run([sys.executable, "-m", "experiments.bench.growth", *args, f"--growth_child={spec}"],
                        capture_output=True, text=True, timeout=3600, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  for line in proc.stdout.splitlines():
    if line.startswith("GROWTH "):
      return json.loads(line[7:])
  raise RuntimeError(f"{spec} failed: {proc.stderr[-2000:]}")


def main(argv):
  del argv
  if GROWTH_CHILD.value:
    child(GROWTH_CHILD.value)
    return
  quick = harness.QUICK.value
  counts = [2, 4, 8] if quick else [int(c) for c in VIDEO_COUNTS.value]
  base = 240 if quick else EXTRACT_FRAMES.value  # videos are at least 30 frames long
  rows = []
  first = None
  for n in counts:
    with tempfile.TemporaryDirectory() as store_dir:
      written = run_child(f"store:{n}:{store_dir}")
      r = run_child(f"temporal:{n}:{store_dir}")
    per_step = r["seconds"] / r["steps"]
    first = first or r
    rows.append(f"| temporal epoch | {n} videos ({r['windows']} windows, {r['steps']} steps) | "
                f"{r['seconds']:.2f} s | {per_step * 1000:.0f} ms/step "
                f"(x{per_step / (first['seconds'] / first['steps']):.2f} of the smallest) | {r['peak_mib']:.0f} "
                f"(writer of the store: {written['peak_mib']:.0f}) |")
    print(rows[-1], flush=True)
  first = None
  for mult in (1, 4, 16):
    with tempfile.TemporaryDirectory() as data_dir:
      made = run_child(f"videos:{base * mult}:{data_dir}")
      r = run_child(f"extract:{base * mult}:{data_dir}")
    # Per frame, and per added frame against the row before (the store's fixed cost, a few
    # seconds of TFDS bookkeeping per split, weighs on the small sizes' per-frame figure).
    per_frame = r["seconds"] / r["frames"]
    added = (f"; {(r['seconds'] - first['seconds']) / (r['frames'] - first['frames']) * 1000:.2f} ms "
             f"per frame added to the row before" if first else "")
    first = r
    rows.append(f"| extraction | {mult}x = {r['frames']} frames | {r['seconds']:.2f} s | "
                f"{per_frame * 1000:.2f} ms/frame{added} | {r['peak_mib']:.0f} "
                f"(generator of the videos: {made['peak_mib']:.0f}) |")
    print(rows[-1], flush=True)
  size = "smoke" if quick else TEMPORAL_SIZE.value
  text = harness.header(
      "Growth: temporal epoch and extraction vs data size",
      f"temporal: configs/va.py:size={size} model and batch, {400 if quick else FRAMES_PER_VIDEO.value} "
      f"frames per video, 768-d features, Grain 0 workers; extraction: the extract stage's "
      f"write_features, tiny encoder at 64x64, batch {extract.get_config('size=tiny').batch_size}, "
      "8 synthetic videos (all splits) made by another process; each row its own process") + "\n".join([
          "| stage | data | time | per unit (growth) | peak RSS MiB |", "|---|---|---|---|---|", *rows]) + "\n"
  harness.append_text(text)
  harness.write_summary("growth", dict(rows=rows, quick=quick))


if __name__ == "__main__":
  app.run(main)
