r"""Throughput of the MAE image pipeline (decode, random resized crop, flip, normalise).

Measures images/s with 0, 1 and 2 Grain worker processes on synthetic 112x112 JPEG faces
(or every *.jpg / *.png under --image_dir), resized to --image_size, and appends the figures
with date and machine to experiments/RESULTS_data.md.

  python experiments/bench_loader.py --image_size=224 --batch_size=64 --num_batches=40
"""

import datetime
import io
import os
import pathlib
import platform
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

from affect_jax.data import pipelines

_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of JPEG/PNG faces; synthetic if unset.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Synthetic images to make.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 112, "Side of the synthetic JPEGs.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output side.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Per-process batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 40, "Timed batches per setting.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches (worker start-up).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "mp_prefetch worker counts to time.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "Grain read threads per process.")
_RESULTS = flags.DEFINE_string(
    "results", str(pathlib.Path(__file__).with_name("RESULTS_data.md")),
    "Markdown file the figures are appended to ('' = print only).")


def synthetic_faces(count: int, size: int, seed: int = 0) -> list[dict[str, bytes]]:
  """Smooth random colour fields saved as JPEG (quality 90), roughly face-crop sized files."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(count):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    records.append({"image": buffer.getvalue()})
  return records


def folder_faces(folder: str) -> list[dict[str, bytes]]:
  paths = sorted(p for p in pathlib.Path(folder).rglob("*") if p.suffix.lower() in
                 (".jpg", ".jpeg", ".png"))
  if not paths:
    raise ValueError(f"--image_dir={folder}: no .jpg/.jpeg/.png files")
  return [{"image": p.read_bytes(), "path": str(p)} for p in paths]


def images_per_second(records, num_workers: int) -> float:
  iterator = pipelines.mae_images_pipeline(
      {"faces": records}, weights=None, batch_size=_BATCH_SIZE.value,
      image_size=_IMAGE_SIZE.value, seed=0, num_workers=num_workers,
      read_threads=_READ_THREADS.value, process_index=0, process_count=1)
  try:
    for _ in range(_WARMUP_BATCHES.value):
      next(iterator)
    start = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
      batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (_BATCH_SIZE.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)
  finally:
    iterator.close()
  return _NUM_BATCHES.value * _BATCH_SIZE.value / elapsed


def main(argv):
  del argv
  if _IMAGE_DIR.value:
    records, origin = folder_faces(_IMAGE_DIR.value), f"folder {_IMAGE_DIR.value}"
  else:
    records = synthetic_faces(_NUM_IMAGES.value, _SOURCE_SIZE.value)
    origin = f"{len(records)} synthetic {_SOURCE_SIZE.value}px JPEGs"
  load_before = os.getloadavg()
  rows = []
  for workers in (int(w) for w in _WORKERS.value):
    rate = images_per_second(records, workers)
    rows.append((workers, rate))
    print(f"workers={workers}: {rate:.0f} images/s")

  machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, " \
            f"Python {platform.python_version()})"
  lines = [
      "",
      f"## MAE image pipeline throughput — {datetime.datetime.now():%Y-%m-%d %H:%M}",
      "",
      f"- machine: {machine}; load average before/after "
      f"{load_before[0]:.2f}/{os.getloadavg()[0]:.2f} (other jobs share these CPUs)",
      f"- input: {origin} -> {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, batch "
      f"{_BATCH_SIZE.value}, {_NUM_BATCHES.value} timed batches after {_WARMUP_BATCHES.value} "
      f"warm-up, read_threads={_READ_THREADS.value}",
      "- command: `python experiments/bench_loader.py` (experiments/bench_loader.py)",
      "",
      "| mp_prefetch workers | images/s |",
      "|---|---|",
  ] + [f"| {w} | {rate:.0f} |" for w, rate in rows] + [""]
  text = "\n".join(lines)
  print(text)
  if _RESULTS.value:
    with open(_RESULTS.value, "a", encoding="utf-8") as results:  # Others append here too.
      results.write(text)


if __name__ == "__main__":
  app.run(main)
