r"""Speed of the synthetic Aff-Wild2 generator (frames/s on one core) and where the time goes.

Generates --videos x --frames into a temporary folder (no face-image datasets), reports
frames/s by wall clock and by this process's CPU time (the generator is single-threaded, so CPU
frames/s is the per-core figure), then times the stages on one video: affect simulation and
face geometry, drawing, JPEG encoding. Appends the figures with date and machine to
experiments/RESULTS_data.md.

  python experiments/bench_synthetic.py --videos=8 --frames=600
"""

import datetime
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from affect_jax.data import synthetic
from affect_jax.data import synthetic_faces

_VIDEOS = flags.DEFINE_integer("videos", 8, "Labelled videos to generate.")
_FRAMES = flags.DEFINE_integer("frames", 600, "Mean frames per video.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")
_RESULTS = flags.DEFINE_string(
    "results", str(pathlib.Path(__file__).with_name("RESULTS_data.md")),
    "Markdown file the figures are appended to ('' = print only).")


def stage_times(num_frames: int, seed: int) -> dict[str, float]:
  """Seconds per frame of each generation stage, on one video of `num_frames` at 30 fps."""
  rng = np.random.default_rng(seed)
  times = {}
  start = time.process_time()
  affect = synthetic.simulate_affect(rng, num_frames, 30.0)
  track = synthetic.face_track(affect, rng, 30.0)
  times["affect state"] = time.process_time() - start
  identity = synthetic_faces.sample_identity(rng)
  scene = synthetic_faces.sample_scene(rng)
  start = time.process_time()
  synthetic_faces._face_parts(identity, track)  # pylint: disable=protected-access
  times["geometry"] = time.process_time() - start
  start = time.process_time()
  images = list(synthetic_faces.render_faces(identity, scene, track))
  times["geometry + drawing"] = time.process_time() - start
  start = time.process_time()
  for img in images:
    synthetic_faces.encode_jpeg(img, scene.jpeg_quality)
  times["JPEG encoding"] = time.process_time() - start
  return {k: v / num_frames for k, v in times.items()}


def main(argv):
  del argv
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as out:
    wall, cpu = time.perf_counter(), time.process_time()
    summary = synthetic.generate(out, num_videos=_VIDEOS.value, frames_per_video=_FRAMES.value,
                                 seed=_SEED.value, num_test_videos=0, affectnet_images=0,
                                 rafdb_images=0, fer2013_images=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  frames = sum(v["num_frames"] for v in summary["videos"])
  stages = stage_times(_FRAMES.value, _SEED.value)
  machine = (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()})")
  lines = [
      "",
      f"## Synthetic Aff-Wild2 generation speed — {datetime.datetime.now():%Y-%m-%d %H:%M}",
      "",
      f"- machine: {machine}; load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}"
      " (other jobs share these CPUs)",
      f"- {len(summary['videos'])} videos, {frames} frames (112x112 JPEG + labels + truth), seed {_SEED.value}",
      f"- command: `python experiments/bench_synthetic.py --videos={_VIDEOS.value} --frames={_FRAMES.value}`",
      "",
      "| measure | value |",
      "|---|---|",
      f"| frames/s, wall clock | {frames / wall:.0f} |",
      f"| frames/s per core (process CPU time) | {frames / cpu:.0f} |",
  ] + [f"| {name}, ms/frame | {1e3 * t:.3f} |" for name, t in stages.items()] + [""]
  text = "\n".join(lines)
  print(text)
  if _RESULTS.value:
    with open(_RESULTS.value, "a", encoding="utf-8") as results:  # Others append here too.
      results.write(text)


if __name__ == "__main__":
  app.run(main)
