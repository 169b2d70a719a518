"""Per-frame predictions in the challenge's submission format, post-processing, and pictures.

Submission files (SPEC §1): one row per frame of every video, frames 1..T, including frames without
a face image:
  VA    image_location,valence,arousal          2-30-640x360/00001.jpg,0.5,-0.5
  EXPR  image_location,Neutral,...,Other        2-30-640x360/00001.jpg,4      (one class index)
  AU    image_location,AU1,...,AU26             2-30-640x360/00001.jpg,0,1,...
"""

import csv
import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from affect_jax.data import schema

COLUMNS = {
    "va": ("valence", "arousal"),
    "expr": schema.EXPR_CLASSES,
    "au": schema.AU_NAMES,
}


def mode_filter(labels, window):
  """Most frequent label in a centred window of `window` frames (ties: the smallest class)."""
  labels = np.asarray(labels)
  if window <= 1 or labels.size == 0:
    return labels
  num_classes = int(labels.max()) + 1
  onehot = np.eye(num_classes, dtype=np.int32)[labels]
  cumulative = np.concatenate([np.zeros((1, num_classes), np.int32), np.cumsum(onehot, 0)])
  half = window // 2
  idx = np.arange(labels.size)
  lo = np.clip(idx - half, 0, labels.size)
  hi = np.clip(idx - half + window, 0, labels.size)
  counts = cumulative[hi] - cumulative[lo]
  return counts.argmax(-1).astype(labels.dtype)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def postprocess(task, outputs, *, au_thresholds=0.5, expr_smoothing_frames=0):
  """Raw per-frame model outputs [T, K] of one video -> submitted values [T, K'] for `task`."""
  outputs = np.asarray(outputs, np.float32)
  if task == "va":
    return np.clip(outputs, -1.0, 1.0)
  if task == "expr":
    labels = outputs.argmax(-1)
    return mode_filter(labels, expr_smoothing_frames)[:, None]
  if task == "au":
    return (sigmoid(outputs) >= np.asarray(au_thresholds, np.float32)).astype(np.int32)
  raise ValueError(f"Unknown task {task!r}")


def write_submission(path, task, videos):
  """Writes `videos`: iterable of (video_id, values [T, K']) as returned by `postprocess`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    f.write(",".join(("image_location",) + tuple(COLUMNS[task])) + "\n")
    for video_id, values in videos:
      values = np.asarray(values)
      for k, row in enumerate(values, start=1):
        if task == "va":
          cells = [f"{float(v):.6f}" for v in row]
        elif task == "expr":
          cells = [str(int(row[0]))]
        else:
          cells = [str(int(v)) for v in row]
        f.write(f"{video_id}/{k:05d}.jpg," + ",".join(cells) + "\n")


def read_submission(path, task):
  """Reads a submission file back: {video_id: values [T, K']} (frames in order, checked)."""
  result = {}
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    if tuple(header[1:]) != tuple(COLUMNS[task]) and not (task == "expr" and len(header) == 9):
      raise ValueError(f"{path}: header {header} is not the {task} submission header")
    for line_number, row in enumerate(reader, start=2):
      video_id, image = row[0].rsplit("/", 1)
      frames = result.setdefault(video_id, [])
      if int(image.split(".")[0]) != len(frames) + 1:
        raise ValueError(f"{path}:{line_number}: frame {image} out of order for {video_id}")
      frames.append([float(v) for v in row[1:]])
  return {k: np.asarray(v, np.float32) for k, v in result.items()}


def _figure_to_array(fig):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  buffer.seek(0)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(buffer).convert("RGB"))


def va_timeline_image(video_id, true_va, valid, pred_va):
  """Predicted vs annotated valence and arousal over a video, as an RGB array."""
  fig, axes = plt.subplots(2, 1, figsize=(8, 4), sharex=True)
  frames = np.arange(1, len(pred_va) + 1)
  for d, name in enumerate(("valence", "arousal")):
    truth = np.where(valid, true_va[:, d], np.nan)
    axes[d].plot(frames, truth, color="black", lw=1, label="annotation")
    axes[d].plot(frames, pred_va[:, d], color="tab:red", lw=1, label="prediction")
    axes[d].set_ylim(-1.05, 1.05)
    axes[d].set_ylabel(name)
  axes[0].set_title(video_id)
  axes[0].legend(loc="upper right", fontsize=7)
  axes[1].set_xlabel("frame")
  fig.tight_layout()
  return _figure_to_array(fig)


def confusion_image(confusion, class_names=schema.EXPR_CLASSES):
  """Row-normalised confusion matrix (rows: truth) as an RGB array."""
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
  ax.set_xticks(range(len(class_names)), class_names, rotation=60, fontsize=7)
  ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("annotated")
  for i in range(len(class_names)):
    for j in range(len(class_names)):
      ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6)
  fig.tight_layout()
  return _figure_to_array(fig)
