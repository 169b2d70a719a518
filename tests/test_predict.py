"""affect_jax.predict on real pixels: the astronaut photograph as a moving video, a face-less video,
and files that are not videos."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

from affect_jax import predict  # pylint: disable=g-import-not-at-top
from affect_jax import predict_faces
from affect_jax.data import schema
from affect_jax.train import checkpointing

NUM_FRAMES = 40


def _save(directory, state):
  checkpointer = checkpointing.Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  checkpointer.save(0, state)
  checkpointer.close()


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """A run's layout with the smoke-size encoder and VA/EXPR/AU models (initial weights, saved by Orbax)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  config = predict._config_from_module("mae_finetune", "size=smoke")  # pylint: disable=protected-access
  model, inputs = predict._build("mae_finetune", config)  # pylint: disable=protected-access
  params = nn.unbox(model.init(jax.random.key(0), *inputs, train=False)["params"])
  _save(os.path.join(workdir, "mae_finetune"), {"params": params})
  for seed, task in enumerate(predict.TASK_STAGES):
    task_config = predict._config_from_module(task, "size=smoke")  # pylint: disable=protected-access
    temporal, _ = predict._build(task, task_config)  # pylint: disable=protected-access
    variables = temporal.init(jax.random.key(seed + 1), jnp.zeros((1, task_config.window, model.encoder.width)),
                              jnp.ones((1, task_config.window), bool), train=False)
    _save(os.path.join(workdir, task), {"params": nn.unbox(variables["params"]),
                                        "batch_stats": variables.get("batch_stats", {})})
  return workdir


@pytest.fixture(scope="session")
def models(smoke_workdir):
  return predict.load_models(smoke_workdir)  # configs found from the checkpoints' shapes


@pytest.fixture(scope="session")
def detector():
  return predict_faces.Detector("mtcnn")


def _write_video(path, frames, fps=25):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    for image in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="session")
def astronaut_video(tmp_path_factory):
  """40 frames of the astronaut (512x512) shifted, zoomed and rotated a little, downscaled to 320."""
  image = skimage_data.astronaut()
  rng = np.random.default_rng(0)
  frames = []
  for i in range(NUM_FRAMES):
    angle = 8 * np.sin(i / 6) + rng.uniform(-1, 1)
    zoom = 1 + 0.1 * np.sin(i / 9)
    matrix = cv2.getRotationMatrix2D((224, 120), angle, zoom)
    matrix[:, 2] += (12 * np.sin(i / 5), 8 * np.cos(i / 7))
    moved = cv2.warpAffine(image, matrix, (512, 512), borderMode=cv2.BORDER_REFLECT)
    frames.append(cv2.resize(moved, (320, 320), interpolation=cv2.INTER_AREA))
  path = tmp_path_factory.mktemp("videos") / "astronaut.mp4"
  _write_video(path, frames)
  return str(path)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_astronaut_video_gets_faces_and_complete_outputs(astronaut_video, smoke_workdir, models, detector, tmp_path):
  out, results = predict.predict(astronaut_video, smoke_workdir, str(tmp_path / "out"), models=models,
                                 detector=detector, video_out=True)
  rows = _read_csv(os.path.join(out, "predictions.csv"))
  assert len(rows) == NUM_FRAMES
  assert tuple(rows[0]) == predict.CSV_COLUMNS
  assert [int(r["frame"]) for r in rows] == list(range(1, NUM_FRAMES + 1))
  np.testing.assert_allclose([float(r["time_s"]) for r in rows], np.arange(NUM_FRAMES) / 25, atol=1e-3)
  found = np.mean([r["face_found"] == "1" for r in rows])
  assert found >= 0.95, f"face found in {found:.0%} of frames"
  # The astronaut's face sits near (224, 120) of the 512 image, (140, 75) at 320: boxes must cover it.
  for r in rows:
    if r["face_found"] == "1":
      x, y, w, h = (float(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
      assert x < 150 < x + w + 15 and y < 80 < y + h + 15 and 25 < w < 110, r
  for r in rows:
    assert -1 <= float(r["valence"]) <= 1 and -1 <= float(r["arousal"]) <= 1
    assert r["expression"] in schema.EXPR_CLASSES
    probs = [float(r[f"p_{c}"]) for c in schema.EXPR_CLASSES]
    assert abs(sum(probs) - 1) < 1e-3 and r["expression"] == schema.EXPR_CLASSES[int(np.argmax(probs))]
    assert all(0 <= float(r[a]) <= 1 for a in schema.AU_NAMES)
  png = os.path.join(out, "timeline.png")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(png) as image:
    assert image.size[0] > 500 and image.size[1] > 400
  with av.open(os.path.join(out, "annotated.mp4")) as container:
    assert sum(1 for _ in container.decode(video=0)) == NUM_FRAMES


def test_aligned_crop_puts_the_eyes_on_the_template(astronaut_video, detector):
  frame = next(iter(predict_faces.FrameSource(astronaut_video)))
  face = predict_faces.choose_face(detector.detect([frame.rgb])[0], None)
  assert face is not None and face.landmarks is not None
  matrix = predict_faces.similarity_from_landmarks(face.landmarks)
  mapped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
  # A similarity cannot fit five points exactly; a real face lands within a few pixels of the template.
  assert np.abs(mapped - predict_faces.TEMPLATE_112).max() < 6
  assert predict_faces.align_face(frame.rgb, face).shape == (112, 112, 3)


def test_stream_mode_is_causal_and_reports_latency(astronaut_video, smoke_workdir, models, detector, tmp_path):
  out, results = predict.predict(astronaut_video, smoke_workdir, str(tmp_path / "stream"), models=models,
                                 detector=detector, stream=True, max_frames=8)
  rows = _read_csv(os.path.join(out, "predictions.csv"))
  assert len(rows) == 8 and all(float(r["latency_ms"]) > 0 for r in rows)
  # Causal: frame 5's output from the stream equals the offline model run on frames 1..5 only.
  encoder, temporal = models
  offline, _ = predict.predict(astronaut_video, smoke_workdir, str(tmp_path / "first5"), models=models,
                               detector=detector, max_frames=5)
  first5 = _read_csv(os.path.join(offline, "predictions.csv"))
  np.testing.assert_allclose(float(rows[4]["valence"]), float(first5[4]["valence"]), atol=1e-4)


def test_video_without_a_face_has_a_row_per_frame(smoke_workdir, models, detector, tmp_path):
  rng = np.random.default_rng(1)
  frames = [np.clip(rng.normal(120, 30, (96, 128, 3)) + 5 * i, 0, 255).astype(np.uint8) for i in range(12)]
  path = tmp_path / "noise.mp4"
  _write_video(path, frames)
  out, _ = predict.predict(str(path), smoke_workdir, str(tmp_path / "out"), models=models, detector=detector)
  rows = _read_csv(os.path.join(out, "predictions.csv"))
  assert len(rows) == 12 and all(r["face_found"] == "0" and r["bbox_x"] == "" for r in rows)
  # No face anywhere: zero features (the training rule) still give a prediction for every frame.
  assert all(r["valence"] != "" and r["expression"] in schema.EXPR_CLASSES for r in rows)
  assert os.path.exists(os.path.join(out, "timeline.png"))


def test_truncated_and_non_video_files_are_clear_errors(astronaut_video, tmp_path):
  text = tmp_path / "notes.mp4"
  text.write_text("this is not a video\n" * 50)
  with pytest.raises(predict_faces.InputError, match="notes.mp4: not a readable video"):
    predict_faces.FrameSource(str(text))
  data = open(astronaut_video, "rb").read()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(predict_faces.InputError, match="cut.mp4"):
    list(predict_faces.FrameSource(str(cut)))
  with pytest.raises(predict_faces.InputError, match="no such file"):
    predict_faces.FrameSource(str(tmp_path / "missing.mp4"))


def test_missing_task_leaves_its_columns_empty(astronaut_video, smoke_workdir, models, detector, tmp_path):
  encoder, temporal = models
  out, _ = predict.predict(astronaut_video, smoke_workdir, str(tmp_path / "va_only"),
                           models=(encoder, {"va": temporal["va"]}), detector=detector, max_frames=6)
  rows = _read_csv(os.path.join(out, "predictions.csv"))
  assert len(rows) == 6 and all(r["valence"] != "" and r["expression"] == "" and r["AU1"] == "" for r in rows)
