r"""Per-frame valence/arousal, expression and action units for any video, with a picture.

  python -m affect_jax.predict --input=PATH --workdir=W [--out=DIR] [--checkpoint=DIR]
      [--config_arg=size=smoke] [--detector=mtcnn|haar] [--video_out] [--stream]

PATH: a video file, a folder of frames, an image, or a camera index ("0"). W: a trained run; its
W/mae_finetune checkpoint is the encoder (or `--checkpoint`, any folder holding checkpoints/ of
the fine-tuned classifier) and W/va, W/expr, W/au the temporal models (each optional: the columns
of a missing task are left empty).

Configs: W/<stage>/config.json when the run saved one, else configs/<stage>.py with `--config_arg`,
else the size (smoke / tiny / paper) whose parameter shapes match the checkpoint.

Frames without a face follow `affect_jax.data.missing_faces` (the rule of training): the features
of the nearest frame with a face; with `--stream`, where the future is unknown, the latest earlier
face (zeros before the first face).

Writes into OUT (default W/predict/<input name>): predictions.csv (one row per frame: frame
(1-based), time_s, face_found, bbox_x/y/w/h, valence, arousal, expression, p_<class> x 8, <AU> x 12
probabilities), timeline.png, and with --video_out annotated.mp4. --stream runs frame by frame with
a causal window of the temporal model's length and reports the latency per frame.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from affect_jax import allocator
from affect_jax import compilation_cache
from affect_jax import evaluation
from affect_jax import predict_faces
from affect_jax import stages
from affect_jax.data import missing_faces
from affect_jax.data import pipelines
from affect_jax.data import schema
from affect_jax.data import segments
from affect_jax.models import classifier as classifier_lib
from affect_jax.train import mae_finetune
from affect_jax.models import temporal as temporal_models
from affect_jax.train import checkpointing
from affect_jax.train import trainer

TASK_STAGES = ("va", "expr", "au")
CSV_COLUMNS = (("frame", "time_s", "face_found", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "valence", "arousal",
                "expression") + tuple(f"p_{c}" for c in schema.EXPR_CLASSES) + schema.AU_NAMES)


# --- configs and checkpoints ----------------------------------------------------------------------


def _flat_shapes(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat_shapes(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(np.shape(value))
  return out


def _config_from_module(stage, arg):
  try:
    importlib.import_module("configs")
  except ModuleNotFoundError as e:
    raise FileNotFoundError(f"No saved config for stage {stage!r} (W/{stage}/config.json) and the repository's "
                            "configs/ package is not importable: run from the repository root") from e
  if stage == "mae_finetune":
    return importlib.import_module("configs.extract").get_config(arg)
  return importlib.import_module("configs.temporal").get_temporal_config(stage, arg)


def _build(stage, config):
  if stage == "mae_finetune":
    tasks = config.get("finetune_tasks") or config.get("upstream", {}).get("finetune_tasks") or ("expr",)
    model = classifier_lib.classifier_from_config(config.model, mae_finetune.head_size(tuple(tasks)))
    size = config.model.image_size
    inputs = (jnp.zeros((1, size, size, 3)),)
  else:
    model = temporal_models.temporal_model_from_config(config.model, schema.NUM_OUTPUTS[stage])
    inputs = None
  return model, inputs


def _abstract_shapes(stage, config, feature_dim=None):
  model, inputs = _build(stage, config)
  if inputs is None:
    inputs = (jnp.zeros((1, config.window, feature_dim)), jnp.ones((1, config.window), bool))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return _flat_shapes(nn.unbox(dict(variables["params"])))


def stage_config(workdir, stage, params, config_arg=None, feature_dim=None):
  """The stage's config: saved JSON, else configs/ with config_arg, else the size that fits `params`."""
  saved = os.path.join(stages.stage_dir(workdir, stage), "config.json")
  if os.path.exists(saved):
    with open(saved) as f:
      return ml_collections.ConfigDict(json.load(f))
  got = _flat_shapes(params)
  candidates = [config_arg] if config_arg is not None else [f"size={s}" for s in ("smoke", "tiny", "paper")]
  for arg in candidates:
    config = _config_from_module(stage, arg)
    if _abstract_shapes(stage, config, feature_dim) == got:
      logging.info("Config of %s: configs for %r (parameter shapes match)", stage, arg)
      return config
  raise ValueError(f"{stages.stage_dir(workdir, stage)}: no config given (--config_arg) or saved (config.json) "
                   f"fits its checkpoint; tried {candidates}")


@dataclasses.dataclass
class Encoder:
  """The fine-tuned classifier's feature (CLS token) for aligned face crops, batched and jitted."""
  model: classifier_lib.FrameClassifier
  params: dict
  image_size: int
  batch_size: int = 16

  def __post_init__(self):
    self._features = jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False)["feature"])

  def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
    images = np.stack([pipelines.resize_face_image(Image.fromarray(c), self.image_size) for c in crops])
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._features(self.params, padded))[:len(chunk)])
    return np.concatenate(out)


@dataclasses.dataclass
class TemporalModel:
  """One task's temporal model over a whole video (windows merged as in validation) or causally."""
  task: str
  config: ml_collections.ConfigDict
  variables: dict
  batch_size: int = 8

  def __post_init__(self):
    self.model, _ = _build(self.task, self.config)
    self._apply = jax.jit(lambda v, f, m: self.model.apply(v, f, m, train=False).astype(jnp.float32))

  @property
  def window(self):
    return int(self.config.window)

  def video(self, features: np.ndarray) -> np.ndarray:
    """Raw outputs [T, K] for features [T, D]."""
    num_frames = len(features)
    starts = segments.segment_starts(num_frames, self.window, int(self.config.stride))
    windows = np.zeros((len(starts), self.window, features.shape[1]), np.float32)
    masks = np.zeros((len(starts), self.window), bool)
    for i, s in enumerate(starts):
      length = min(self.window, num_frames - s)
      windows[i, :length] = features[s:s + length]
      masks[i, :length] = True
    preds = []
    for b in range(0, len(starts), self.batch_size):
      f = np.zeros((self.batch_size,) + windows.shape[1:], np.float32)
      m = np.zeros((self.batch_size, self.window), bool)
      n = min(self.batch_size, len(starts) - b)
      f[:n], m[:n] = windows[b:b + n], masks[b:b + n]
      preds.append(np.asarray(self._apply(self.variables, f, m))[:n])
    return segments.merge_segment_predictions(num_frames, starts, np.concatenate(preds), masks)

  def last(self, history: np.ndarray) -> np.ndarray:
    """Raw output [K] of the newest frame, the window holding the last `window` frames (causal)."""
    history = history[-self.window:]
    f = np.zeros((1, self.window, history.shape[1]), np.float32)
    m = np.zeros((1, self.window), bool)
    f[0, :len(history)], m[0, :len(history)] = history, True
    return np.asarray(self._apply(self.variables, f, m))[0, len(history) - 1]


def load_models(workdir, checkpoint=None, config_arg=None, batch_size=16):
  """(Encoder, {task: TemporalModel}) of a trained run."""
  encoder_dir = checkpoint or stages.stage_dir(workdir, "mae_finetune")
  if not trainer.has_checkpoint(encoder_dir):
    raise FileNotFoundError(f"{encoder_dir}: no fine-tuned encoder checkpoint (checkpoints/<step>)")
  params = checkpointing.restore_params(trainer.checkpoint_dir(encoder_dir))["params"]
  config = stage_config(workdir, "mae_finetune", params, config_arg)
  model, _ = _build("mae_finetune", config)
  encoder = Encoder(model, params, int(config.model.image_size), batch_size)
  feature_dim = int(model.encoder.width)
  temporal = {}
  for task in TASK_STAGES:
    directory = stages.stage_dir(workdir, task)
    if not trainer.has_checkpoint(directory):
      continue
    state = checkpointing.restore_params(trainer.checkpoint_dir(directory))
    task_config = stage_config(workdir, task, state["params"], config_arg, feature_dim)
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
      variables["batch_stats"] = state["batch_stats"]
    temporal[task] = TemporalModel(task, task_config, variables)
  if not temporal:
    logging.warning("No temporal model in %s (va/expr/au): only faces are reported.", workdir)
  return encoder, temporal


# --- the per-frame results ------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
  time_s: list = dataclasses.field(default_factory=list)
  face_found: list = dataclasses.field(default_factory=list)
  boxes: list = dataclasses.field(default_factory=list)
  features: list = dataclasses.field(default_factory=list)
  outputs: dict = dataclasses.field(default_factory=dict)  # task -> [T, K] raw
  latency_s: list = dataclasses.field(default_factory=list)
  timings: dict = dataclasses.field(default_factory=lambda: dict(decode=0.0, detect_align=0.0, encoder=0.0,
                                                                   temporal=0.0))

  def table(self, temporal):
    """Per-frame columns (CSV_COLUMNS order) as a list of rows."""
    n = len(self.time_s)
    va = np.full((n, 2), np.nan)
    probs = np.full((n, len(schema.EXPR_CLASSES)), np.nan)
    expression = [""] * n
    au = np.full((n, len(schema.AU_NAMES)), np.nan)
    if "va" in self.outputs:
      va = evaluation.postprocess("va", self.outputs["va"])
    if "expr" in self.outputs:
      logits = self.outputs["expr"]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      smoothing = int(temporal["expr"].config.get("expr_smoothing_frames", 0))
      labels = evaluation.postprocess("expr", logits, expr_smoothing_frames=smoothing)[:, 0]
      expression = [schema.EXPR_CLASSES[int(k)] for k in labels]
    if "au" in self.outputs:
      au = evaluation.sigmoid(self.outputs["au"])
    rows = []
    for i in range(n):
      box = self.boxes[i] if self.boxes[i] is not None else [np.nan] * 4
      rows.append([i + 1, round(self.time_s[i], 4), int(self.face_found[i])] + [_cell(v) for v in box] +
                  [_cell(v) for v in va[i]] + [expression[i]] + [_cell(v) for v in probs[i]] +
                  [_cell(v) for v in au[i]])
    return rows


def _cell(value):
  return "" if not np.isfinite(value) else f"{float(value):.5g}"


def _progress(total, enabled):
  if not enabled:
    return None
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total or None, unit="frame", desc="predict")


def run_offline(source, detector, encoder, temporal, chunk=16, progress=False):
  """Whole-input prediction: faces in chunks of frames, then every temporal model on the video."""
  results = Results()
  previous = None
  bar = _progress(len(source), progress)
  frames = iter(source)
  while True:
    t0 = time.perf_counter()
    batch = []
    for frame in frames:
      batch.append(frame)
      if len(batch) == chunk:
        break
    t1 = time.perf_counter()
    results.timings["decode"] += t1 - t0
    if not batch:
      break
    found = detector.detect([f.rgb for f in batch])
    crops, has = [], []
    for frame, faces in zip(batch, found):
      face = predict_faces.choose_face(faces, previous)
      previous = face or previous
      results.time_s.append(frame.time_s)
      results.face_found.append(face is not None)
      results.boxes.append(None if face is None else face.box.tolist())
      if face is not None:
        crops.append(predict_faces.align_face(frame.rgb, face))
      has.append(face is not None)
    t2 = time.perf_counter()
    results.timings["detect_align"] += t2 - t1
    feats = encoder(crops) if crops else None
    k = 0
    for present in has:
      results.features.append(feats[k] if present else None)
      k += present
    results.timings["encoder"] += time.perf_counter() - t2
    if bar is not None:
      bar.update(len(batch))
  if bar is not None:
    bar.close()
  if not results.time_s:
    raise predict_faces.InputError(f"{source.path}: no frames could be read")
  t3 = time.perf_counter()
  dim = encoder.model.encoder.width
  features = np.stack([f if f is not None else np.zeros(dim, np.float32) for f in results.features])
  features = missing_faces.fill_missing_faces(features, np.asarray(results.face_found, bool))
  for task, model in temporal.items():
    results.outputs[task] = model.video(features)
  results.timings["temporal"] += time.perf_counter() - t3
  return results


def run_stream(source, detector, encoder, temporal, progress=False):
  """Frame by frame as frames arrive; each frame's prediction uses only it and earlier frames."""
  results = Results()
  previous = None
  last_feature = np.zeros(encoder.model.encoder.width, np.float32)
  history = []
  outputs = {task: [] for task in temporal}
  bar = _progress(len(source), progress)
  frames = iter(source)
  while True:
    t0 = time.perf_counter()
    frame = next(frames, None)
    t1 = time.perf_counter()
    if frame is None:
      break
    face = predict_faces.choose_face(detector.detect([frame.rgb])[0], previous)
    previous = face or previous
    crop = predict_faces.align_face(frame.rgb, face) if face is not None else None
    t2 = time.perf_counter()
    if crop is not None:
      last_feature = encoder([crop])[0]
    history.append(last_feature)
    history = history[-max([m.window for m in temporal.values()] or [1]):]
    t3 = time.perf_counter()
    for task, model in temporal.items():
      outputs[task].append(model.last(np.stack(history)))
    t4 = time.perf_counter()
    for key, dt in (("decode", t1 - t0), ("detect_align", t2 - t1), ("encoder", t3 - t2), ("temporal", t4 - t3)):
      results.timings[key] += dt
    results.latency_s.append(t4 - t1)
    results.time_s.append(frame.time_s)
    results.face_found.append(face is not None)
    results.boxes.append(None if face is None else face.box.tolist())
    results.features.append(None)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if not results.time_s:
    raise predict_faces.InputError(f"{source.path}: no frames could be read")
  results.outputs = {task: np.stack(v) for task, v in outputs.items()}
  return results


# --- writing --------------------------------------------------------------------------------------


def write_csv(path, results, temporal):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS + (("latency_ms",) if results.latency_s else ()))
    for i, row in enumerate(results.table(temporal)):
      writer.writerow(row + ([f"{1000 * results.latency_s[i]:.2f}"] if results.latency_s else []))


def write_timeline(path, results, title):
  """VA curves, expression ribbon and AU heat-map over time; face-less frames shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  t = np.asarray(results.time_s)
  no_face = ~np.asarray(results.face_found, bool)
  fig, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True, gridspec_kw=dict(height_ratios=[2, 0.6, 2]))
  extent_t = (t[0], t[-1] if len(t) > 1 else t[0] + 1e-3)
  for ax in axes:
    for i in np.flatnonzero(no_face):
      ax.axvspan(t[i] - 0.5 / 30, t[i] + 0.5 / 30, color="0.9", lw=0)
  if "va" in results.outputs:
    va = np.clip(results.outputs["va"], -1, 1)
    axes[0].plot(t, va[:, 0], color="tab:red", label="valence")
    axes[0].plot(t, va[:, 1], color="tab:blue", label="arousal")
    axes[0].legend(loc="upper right", fontsize=7)
  else:
    axes[0].text(0.5, 0.5, "no VA model", ha="center", transform=axes[0].transAxes)
  axes[0].set_ylim(-1.05, 1.05)
  axes[0].set_title(title + "   (grey: no face)")
  if "expr" in results.outputs:
    labels = results.outputs["expr"].argmax(-1)
    cmap = plt.get_cmap("tab10", len(schema.EXPR_CLASSES))
    axes[1].imshow(labels[None], aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(schema.EXPR_CLASSES) - 0.5,
                   extent=(*extent_t, 0, 1), interpolation="nearest")
    handles = [matplotlib.patches.Patch(color=cmap(k), label=c) for k, c in enumerate(schema.EXPR_CLASSES)]
    axes[1].legend(handles=handles, ncol=8, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.05))
  else:
    axes[1].text(0.5, 0.5, "no EXPR model", ha="center", transform=axes[1].transAxes)
  axes[1].set_yticks([])
  axes[1].set_ylabel("expr")
  if "au" in results.outputs:
    probs = evaluation.sigmoid(results.outputs["au"]).T
    axes[2].imshow(probs, aspect="auto", vmin=0, vmax=1, cmap="magma", extent=(*extent_t, len(schema.AU_NAMES), 0),
                   interpolation="nearest")
    axes[2].set_yticks(np.arange(len(schema.AU_NAMES)) + 0.5, schema.AU_NAMES, fontsize=6)
  else:
    axes[2].text(0.5, 0.5, "no AU model", ha="center", transform=axes[2].transAxes)
  axes[2].set_xlabel("time (s)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_annotated_video(path, source, results, temporal):
  """The input with the face box and the predictions drawn on each frame (H.264 MP4, PyAV)."""
  import av  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  rows = results.table(temporal)
  with av.open(path, "w") as container:
    stream = None
    for frame in source:
      if frame.index >= len(rows):
        break
      if stream is None:
        stream = container.add_stream("libx264", rate=max(1, round(source.fps)))
        stream.height, stream.width = frame.rgb.shape[0] // 2 * 2, frame.rgb.shape[1] // 2 * 2
        stream.pix_fmt = "yuv420p"
      image = np.ascontiguousarray(frame.rgb[:stream.height, :stream.width])
      row = dict(zip(CSV_COLUMNS, rows[frame.index]))
      if row["face_found"]:
        x, y, w, h = (int(float(row[k])) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        cv2.rectangle(image, (x, y), (x + w, y + h), (0, 255, 0), 2)
      text = " ".join(f"{k[:3]}={row[k]}" for k in ("valence", "arousal", "expression") if row[k] != "")
      cv2.putText(image, text or "no face", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 0), 2)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    if stream is not None:
      for packet in stream.encode():
        container.mux(packet)


def predict(input_path, workdir, out_dir=None, *, checkpoint=None, config_arg=None, detector="mtcnn",
            stream=False, video_out=False, fps=30.0, max_frames=None, progress=False, models=None):
  """Runs the whole prediction and writes the outputs; returns (out_dir, Results)."""
  source = predict_faces.FrameSource(input_path, fps=fps, max_frames=max_frames)
  encoder, temporal = models or load_models(workdir, checkpoint, config_arg)
  face_detector = detector if isinstance(detector, predict_faces.Detector) else predict_faces.Detector(detector)
  name = os.path.splitext(os.path.basename(os.path.normpath(input_path)))[0] or "input"
  out_dir = out_dir or os.path.join(workdir, "predict", name)
  os.makedirs(out_dir, exist_ok=True)
  runner = run_stream if stream else run_offline
  results = runner(source, face_detector, encoder, temporal, progress=progress)
  write_csv(os.path.join(out_dir, "predictions.csv"), results, temporal)
  write_timeline(os.path.join(out_dir, "timeline.png"), results, name)
  if video_out and source.kind != "camera":
    write_annotated_video(os.path.join(out_dir, "annotated.mp4"), source, results, temporal)
  n = len(results.time_s)
  summary = dict(frames=n, faces=int(np.sum(results.face_found)), tasks=sorted(temporal),
                 seconds={k: round(v, 3) for k, v in results.timings.items()})
  if results.latency_s:
    latency = np.asarray(results.latency_s[1:] or results.latency_s) * 1000  # first frame compiles
    summary["latency_ms"] = dict(median=float(np.median(latency)), p95=float(np.percentile(latency, 95)))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("Predicted %d frames (%d with a face) into %s: %s", n, summary["faces"], out_dir, summary)
  return out_dir, results


_INPUT = flags.DEFINE_string("input", None, "Video file, folder of frames, image, or camera index.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (W/mae_finetune, W/va, W/expr, W/au).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default W/predict/<input name>).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Encoder folder holding checkpoints/ (default W/mae_finetune).")
_CONFIG_ARG = flags.DEFINE_string("config_arg", None, "configs argument of the run, e.g. 'size=smoke'.")
_DETECTOR = flags.DEFINE_enum("detector", "mtcnn", list(predict_faces.DETECTORS), "Face detector.")
_STREAM = flags.DEFINE_bool("stream", False, "Frame by frame with a causal window; reports latency.")
_VIDEO_OUT = flags.DEFINE_bool("video_out", False, "Also write annotated.mp4.")
_FPS = flags.DEFINE_float("fps", 30.0, "Frame rate of a folder of frames.")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Stop after this many frames.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  allocator.limit_arenas()  # before the data pipelines' threads (affect_jax/allocator.py)
  compilation_cache.enable()  # before the first compilation (affect_jax/compilation_cache.py)
  if not _INPUT.value or not _WORKDIR.value:
    raise app.UsageError("--input and --workdir are required")
  try:
    out_dir, _ = predict(_INPUT.value, _WORKDIR.value, _OUT.value, checkpoint=_CHECKPOINT.value,
                         config_arg=_CONFIG_ARG.value, detector=_DETECTOR.value, stream=_STREAM.value,
                         video_out=_VIDEO_OUT.value, fps=_FPS.value, max_frames=_MAX_FRAMES.value, progress=True)
  except (predict_faces.InputError, FileNotFoundError) as e:
    raise SystemExit(f"predict: {e}") from e
  print(f"Predictions: {out_dir}/predictions.csv, timeline: {out_dir}/timeline.png")


if __name__ == "__main__":
  app.run(main)
