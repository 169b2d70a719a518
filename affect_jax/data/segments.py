"""Cutting per-video feature sequences into fixed windows, and merging window outputs back.

The paper trains the temporal model on windows of ``w`` frames taken every ``s`` frames: segment
``i`` (1-based) covers frames ``(i-1)*s+1 ... (i-1)*s+w``. Two rules complete that definition:

* **Tail.** Stepping by ``s`` alone leaves the last ``(n - w) % s`` frames uncovered, so one more
  window is added that ends on the last frame (it starts at ``n - w``) whenever the regular
  windows stop short. Every window of a video at least ``w`` frames long is therefore full; only
  a video shorter than one window is padded (one window starting at 0, ``frame_mask`` False on the
  padded tail).
* **Merge.** Windows overlap, but a score must use each frame exactly once (SPEC §2). Each frame
  takes its prediction from the window in which it lies most centrally (smallest distance to the
  window centre; ties go to the earlier window). No averaging: merging identical per-frame values
  returns them bit for bit, and a frame is predicted with as much context on both sides as the
  windows offer.

Pure numpy; no framework imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Per-frame arrays of a `videos` / feature-store record that a window carries (see schema.py).
PER_FRAME_KEYS = ("has_face", "va", "va_valid", "expr", "expr_valid", "au", "au_valid")
_VALID_KEY_OF_TASK = {"va": "va_valid", "expr": "expr_valid", "au": "au_valid"}


def segment_starts(num_frames: int, window: int = 300, stride: int = 200) -> np.ndarray:
  """0-based first frame of every window of a video, covering every frame.

  Regular starts are ``0, s, 2s, ...`` while the window fits; if they stop short of the last
  frame, a tail window starting at ``num_frames - window`` is appended. A video shorter than
  ``window`` gets the single start 0 (its window is padded by `cut_segments`).

  Returns:
    int64 array of strictly increasing starts.
  """
  if window <= 0 or stride <= 0:
    raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
  if stride > window:
    raise ValueError(f"stride {stride} > window {window} would skip frames between windows")
  if num_frames <= 0:
    raise ValueError(f"num_frames must be positive, got {num_frames}")
  last_full_start = max(num_frames - window, 0)
  starts = list(range(0, last_full_start + 1, stride))
  if starts[-1] < last_full_start:
    starts.append(last_full_start)
  return np.asarray(starts, dtype=np.int64)


def jittered_start(start: int, num_frames: int, window: int, jitter: int,
                   rng: np.random.Generator) -> int:
  """``start`` moved by a uniform integer in ``[-jitter, jitter]``, kept inside the video."""
  if jitter <= 0:
    return int(start)
  shifted = int(start) + int(rng.integers(-jitter, jitter + 1))
  return int(np.clip(shifted, 0, max(num_frames - window, 0)))


def video_name(record: Mapping[str, Any]) -> str:
  """The record's ``video_id`` as text (TFDS data sources return it as bytes)."""
  video_id = record.get("video_id", "?")
  if isinstance(video_id, np.ndarray):
    video_id = video_id.item()
  if isinstance(video_id, bytes):
    video_id = video_id.decode("utf-8", errors="replace")
  return str(video_id)


def check_video_record(record: Mapping[str, Any]) -> int:
  """Checks that every per-frame array has ``num_frames`` rows; returns ``num_frames``.

  Raises a ValueError naming the video and the offending key otherwise.
  """
  name = video_name(record)
  if "features" not in record:
    raise ValueError(f"video {name}: record has no 'features' (keys: {sorted(record)})")
  num_frames = int(np.asarray(record["num_frames"]))
  for key in ("features",) + PER_FRAME_KEYS:
    if key not in record:
      raise ValueError(f"video {name}: record lacks per-frame key {key!r}")
    rows = np.shape(record[key])[0] if np.ndim(record[key]) else -1
    if rows != num_frames:
      raise ValueError(
          f"video {name}: {key!r} has {rows} rows but num_frames is {num_frames}")
  return num_frames


def cut_window(record: Mapping[str, Any], start: int, window: int) -> dict[str, np.ndarray]:
  """Frames ``start .. start+window-1`` of a video record, zero-padded past the end.

  Returns ``features [w, D]``, ``frame_mask [w]`` (True on real frames), the per-frame labels and
  ``<task>_valid`` masks (False on padding and where the task is not annotated for this video),
  and ``start``.
  """
  num_frames = check_video_record(record)
  if not 0 <= start < num_frames:
    raise ValueError(
        f"video {video_name(record)}: window start {start} outside [0, {num_frames})")
  stop = min(start + window, num_frames)
  length = stop - start
  out = {}
  for key in ("features",) + PER_FRAME_KEYS:
    values = np.asarray(record[key])
    padded = np.zeros((window,) + values.shape[1:], dtype=values.dtype)
    padded[:length] = values[start:stop]
    out[key] = padded
  frame_mask = np.zeros((window,), dtype=bool)
  frame_mask[:length] = True
  out["frame_mask"] = frame_mask
  for task, valid_key in _VALID_KEY_OF_TASK.items():
    labelled = bool(np.asarray(record.get(f"labels_{task}", True)))
    out[valid_key] = out[valid_key].astype(bool) & frame_mask & labelled
  out["start"] = np.int64(start)
  return out


def cut_segments(video_record: Mapping[str, Any], window: int = 300, stride: int = 200,
                 offset: int = 0, video_index: int = 0) -> list[dict[str, np.ndarray]]:
  """All windows of one video (see `cut_window` for the fields), plus ``video_index``.

  ``offset`` shifts every start by that many frames (clipped so windows stay inside the video,
  duplicates dropped). It exists for training-time jitter: with ``offset > 0`` the first
  ``offset`` frames are not covered. Evaluation uses ``offset=0``, which covers every frame.
  """
  num_frames = check_video_record(video_record)
  starts = segment_starts(num_frames, window, stride) + int(offset)
  starts = np.unique(np.clip(starts, 0, max(num_frames - window, 0)))
  segments = []
  for start in starts:
    segment = cut_window(video_record, int(start), window)
    segment["video_index"] = np.int64(video_index)
    segments.append(segment)
  return segments


def frame_owner(num_frames: int, starts: Sequence[int],
                window: int) -> tuple[np.ndarray, np.ndarray]:
  """For each frame, the window that predicts it and the position inside that window.

  The owner is the window whose centre is nearest the frame (ties: earlier window). Raises if
  some frame lies in no window.

  Returns:
    (segment [num_frames] int64, position [num_frames] int64).
  """
  starts = np.asarray(starts, dtype=np.int64)
  frames = np.arange(num_frames, dtype=np.int64)
  inside = (frames[None, :] >= starts[:, None]) & (frames[None, :] < starts[:, None] + window)
  uncovered = np.flatnonzero(~inside.any(axis=0))
  if uncovered.size:
    raise ValueError(f"frames {uncovered[:10].tolist()} (0-based) lie in no window; "
                     f"starts={starts.tolist()} window={window} num_frames={num_frames}")
  # Twice the distance keeps the centre (start + (w-1)/2) an integer.
  distance = np.abs(2 * (frames[None, :] - starts[:, None]) - (window - 1))
  distance = np.where(inside, distance, np.iinfo(np.int64).max)
  segment = np.argmin(distance, axis=0)  # argmin returns the first minimum: earlier window wins.
  position = frames - starts[segment]
  return segment, position


def merge_segment_predictions(num_frames: int, starts: Sequence[int], preds: np.ndarray,
                              frame_masks: np.ndarray) -> np.ndarray:
  """One prediction per frame from overlapping window predictions ``preds [S, w, ...]``.

  Each frame takes the value from the window in which it is most central (module docstring).
  ``frame_masks [S, w]`` must mark the chosen position as a real frame; a mismatch means the
  windows and the video disagree and raises.

  Returns:
    ``[num_frames, ...]`` array, dtype of ``preds``.
  """
  preds = np.asarray(preds)
  frame_masks = np.asarray(frame_masks, dtype=bool)
  starts = np.asarray(starts, dtype=np.int64)
  if preds.shape[0] != starts.shape[0] or frame_masks.shape != preds.shape[:2]:
    raise ValueError(f"inconsistent shapes: starts {starts.shape}, preds {preds.shape}, "
                     f"frame_masks {frame_masks.shape}")
  window = preds.shape[1]
  segment, position = frame_owner(num_frames, starts, window)
  if not frame_masks[segment, position].all():
    bad = np.flatnonzero(~frame_masks[segment, position])
    raise ValueError(f"frames {bad[:10].tolist()} map to padded window positions")
  return preds[segment, position]


def merge_batched_segments(video_index: np.ndarray, start: np.ndarray, segment_valid: np.ndarray,
                           preds: np.ndarray, frame_mask: np.ndarray,
                           num_frames: Mapping[int, int]) -> dict[int, np.ndarray]:
  """Per-video frame predictions from the concatenated output of the eval-segments pipeline.

  Args:
    video_index, start, segment_valid: ``[N]`` metadata from the pipeline batches (padding
      segments have ``segment_valid`` False and are ignored).
    preds: ``[N, w, ...]`` model outputs for those segments.
    frame_mask: ``[N, w]``.
    num_frames: video index -> number of frames, for every video expected.

  Returns:
    video index -> ``[num_frames, ...]`` predictions. Raises if a video has no segment.
  """
  keep = np.asarray(segment_valid, dtype=bool)
  video_index = np.asarray(video_index)[keep]
  start = np.asarray(start)[keep]
  preds = np.asarray(preds)[keep]
  frame_mask = np.asarray(frame_mask)[keep]
  merged = {}
  for video, count in num_frames.items():
    rows = np.flatnonzero(video_index == video)
    if rows.size == 0:
      raise ValueError(f"video index {video} has no segment in the predictions")
    order = rows[np.argsort(start[rows], kind="stable")]
    merged[int(video)] = merge_segment_predictions(
        int(count), start[order], preds[order], frame_mask[order])
  return merged

