r"""End-to-end speed of affect_jax.predict: frames/s split into decode, detect/align, encoder, temporal,
and the per-frame latency of --stream. Appends a section to experiments/RESULTS_predict.md.

  python experiments/bench_predict.py --workdir=W [--frames=120] [--size=320] [--detector=mtcnn]

W is a trained run (e.g. `python -m affect_jax.main --config=configs/va.py:size=smoke --workdir=W`).
The input is the scikit-image astronaut photograph made into a moving video, as in the tests.
"""

import datetime
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import av
import cv2
import jax
import numpy as np
from skimage import data as skimage_data

from affect_jax import predict
from affect_jax import predict_faces

# --workdir, --detector and --config_arg are affect_jax.predict's flags.
_WORKDIR, _DETECTOR, _CONFIG_ARG = predict._WORKDIR, predict._DETECTOR, predict._CONFIG_ARG  # pylint: disable=protected-access
_FRAMES = flags.DEFINE_integer("frames", 120, "Frames in the test video.")
_SIZE = flags.DEFINE_integer("size", 320, "Side of the video frames.")
_STREAM_FRAMES = flags.DEFINE_integer("stream_frames", 40, "Frames run in --stream mode.")
_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "RESULTS_predict.md"),
                               "Markdown file the results are appended to.")


def astronaut_video(path, frames, size):
  image = skimage_data.astronaut()
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height = stream.width = size
    stream.pix_fmt = "yuv420p"
    for i in range(frames):
      matrix = cv2.getRotationMatrix2D((224, 120), 8 * np.sin(i / 6), 1 + 0.1 * np.sin(i / 9))
      matrix[:, 2] += (12 * np.sin(i / 5), 8 * np.cos(i / 7))
      moved = cv2.resize(cv2.warpAffine(image, matrix, (512, 512), borderMode=cv2.BORDER_REFLECT), (size, size),
                         interpolation=cv2.INTER_AREA)
      for packet in stream.encode(av.VideoFrame.from_ndarray(moved, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  models = predict.load_models(_WORKDIR.value, config_arg=_CONFIG_ARG.value)
  detector = predict_faces.Detector(_DETECTOR.value)
  encoder, temporal = models
  with tempfile.TemporaryDirectory() as tmp:
    video = os.path.join(tmp, "astronaut.mp4")
    astronaut_video(video, _FRAMES.value, _SIZE.value)
    # Warm-up: compiles the encoder and temporal models and traces the detector at these shapes.
    predict.predict(video, _WORKDIR.value, os.path.join(tmp, "warm"), models=models, detector=detector,
                    max_frames=16)
    start = time.perf_counter()
    _, offline = predict.predict(video, _WORKDIR.value, os.path.join(tmp, "offline"), models=models,
                                 detector=detector)
    total = time.perf_counter() - start
    _, stream = predict.predict(video, _WORKDIR.value, os.path.join(tmp, "stream"), models=models,
                                detector=detector, stream=True, max_frames=_STREAM_FRAMES.value)
  n = len(offline.time_s)
  parts = offline.timings
  latency = np.asarray(stream.latency_s[1:]) * 1000
  stream_parts = {k: 1000 * v / len(stream.time_s) for k, v in stream.timings.items()}
  lines = [
      f"\n## {datetime.datetime.now():%Y-%m-%d %H:%M} — {platform.node()}, {os.cpu_count()} CPUs, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}",
      f"encoder width {encoder.model.encoder.width} depth {encoder.model.encoder.depth}"
      f" at {encoder.image_size}px; temporal tasks {sorted(temporal)}; detector {_DETECTOR.value}; "
      f"{n} frames of {_SIZE.value}x{_SIZE.value}; faces found {int(np.sum(offline.face_found))}/{n}",
      "",
      "| mode | frames/s end to end | decode | detect+align | encoder | temporal | wall s | other s |",
      "|---|---|---|---|---|---|---|---|",
      f"| offline | {n / total:.1f} | " + " | ".join(f"{n / max(parts[k], 1e-9):.0f} f/s ({parts[k]:.2f} s)"
                                                    for k in ("decode", "detect_align", "encoder", "temporal"))
      + f" | {total:.2f} | {total - sum(parts.values()):.2f} (CSV, PNG) |",
      "",
      f"--stream ({len(stream.time_s)} frames, causal window): latency per frame median "
      f"{np.median(latency):.1f} ms, p95 {np.percentile(latency, 95):.1f} ms; mean per frame "
      + ", ".join(f"{k} {v:.1f} ms" for k, v in stream_parts.items()),
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  header = "" if os.path.exists(_RESULTS.value) else (
      "# affect_jax.predict speed\n\nWritten by `experiments/bench_predict.py`; the input is the astronaut "
      "photograph as a moving video. Offline: faces detected in chunks of 16 frames, the encoder batched "
      "(16), every temporal model once over the whole video. Stream: one frame at a time.\n")
  with open(_RESULTS.value, "a") as f:
    f.write(header + text)


if __name__ == "__main__":
  app.run(main)
