"""Turn the Aff-Wild2 files of one split into per-video plans and `frames` / `videos` records.

A split's videos are those with an annotation file of any task in that split's folders (train:
``Train_Set``, validation: ``Validation_Set``) or, for test, those named in any test-set list.
Each split carries only its own labels: a video annotated for VA in Train_Set and for AU in
Validation_Set appears in both splits, labelled for VA in one and for AU in the other.
A video has ``num_frames = max(annotation lines over the split's tasks, highest face image number)``;
frames 1..num_frames all get a record, with or without a face image and with or without labels.
Test videos have no labels (all invalid); their ``labels_<task>`` flags say which task's test
list names them, i.e. which predictions the challenge expects.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from etils import epath
import numpy as np

from affect_jax.data import annotations, schema
from affect_jax.data.builders.affwild2 import layout as layout_lib
from affect_jax.data.builders.bad_data import BadDataLog, LayoutError, jpeg_problem


@dataclasses.dataclass(frozen=True)
class VideoPlan:
  """Everything needed to write one video of one split."""

  video_id: str
  num_frames: int
  labels: dict[str, annotations.TaskAnnotation]  # tasks annotated for this video in this split
  face_images: dict[int, epath.Path]              # frame -> face image
  listed_tasks: tuple[str, ...] = ()              # test split: tasks whose list names the video


def _no_image_folder(video_id: str) -> str:
  return (f"video {video_id} has no face image folder "
          f"{' or '.join(f'{root}/{video_id}' for root in layout_lib.IMAGE_ROOTS)}")


def plan_labelled_split(layout: layout_lib.Layout, split: str, bad_data: BadDataLog) -> list[VideoPlan]:
  """Plans of the train or validation split, sorted by video id."""
  labels_by_video: dict[str, dict[str, annotations.TaskAnnotation]] = {}
  for task, task_dir in layout.task_dirs.items():
    for video_id, path in layout_lib.annotation_files(task_dir, split).items():
      parsed = annotations.read_annotation_file(path, task, bad_data)
      if parsed is not None:
        labels_by_video.setdefault(video_id, {})[task] = parsed
  plans = []
  for video_id in sorted(labels_by_video):
    labels = labels_by_video[video_id]
    if video_id not in layout.image_dirs:
      first_file = labels[next(iter(labels))].path
      bad_data.report(first_file, None, _no_image_folder(video_id))
      continue
    face_images = layout_lib.face_image_paths(layout.image_dirs[video_id], bad_data)
    if not face_images:
      bad_data.report(layout.image_dirs[video_id], None, "video folder has no face images")
      continue
    num_frames = max([a.num_lines for a in labels.values()] + list(face_images))
    plans.append(VideoPlan(video_id, num_frames, labels, face_images))
  return _require_videos(plans, split, layout)


def plan_test_split(layout: layout_lib.Layout, bad_data: BadDataLog) -> list[VideoPlan]:
  """Plans of the test split (videos named in the test lists), sorted by video id."""
  listed: dict[str, list[str]] = {}
  for task, list_path in layout.test_lists.items():
    for line, video_id in annotations.read_video_list(list_path, bad_data):
      if video_id not in layout.image_dirs:
        bad_data.report(list_path, line, _no_image_folder(video_id))
        continue
      tasks = listed.setdefault(video_id, [])
      if task not in tasks:
        tasks.append(task)
  plans = []
  for video_id in sorted(listed):
    face_images = layout_lib.face_image_paths(layout.image_dirs[video_id], bad_data)
    if not face_images:
      bad_data.report(layout.image_dirs[video_id], None, "test video folder has no face images")
      continue
    plans.append(VideoPlan(video_id, max(face_images), {}, face_images, tuple(listed[video_id])))
  return _require_videos(plans, "test", layout)


def _require_videos(plans: list[VideoPlan], split: str, layout: layout_lib.Layout) -> list[VideoPlan]:
  if not plans:
    raise LayoutError(
        f"split {split!r} has no usable video under {layout.root}\n"
        f"Expected Aff-Wild2 layout:\n{layout_lib.EXPECTED_LAYOUT}"
    )
  return plans


def label_arrays(plan: VideoPlan) -> dict[str, np.ndarray]:
  """Per-frame labels of all tasks (``va``, ``va_valid``, ...), invalid where not annotated."""
  arrays = {}
  for task in schema.TASKS:
    values, valid = annotations.invalid_labels(task, plan.num_frames)
    if task in plan.labels:
      parsed = plan.labels[task]
      values[: parsed.num_lines] = parsed.values
      valid[: parsed.num_lines] = parsed.valid
    arrays[task], arrays[f"{task}_valid"] = values, valid
  return arrays


def load_face(plan: VideoPlan, frame: int, bad_data: BadDataLog, verify_decode: bool) -> bytes | None:
  """The face JPEG of ``frame`` as stored, or None (no image, or a bad one skipped)."""
  path = plan.face_images.get(frame)
  if path is None:
    return None
  data = path.read_bytes()
  problem = jpeg_problem(data, verify_decode)
  if problem is not None:
    bad_data.report(path, None, problem)
    return None
  return data


def frame_records(plan: VideoPlan, bad_data: BadDataLog, verify_decode: bool) -> Iterator[dict]:
  """`frames` records of one video, frames 1..num_frames in order."""
  labels = label_arrays(plan)
  for frame in range(1, plan.num_frames + 1):
    image = load_face(plan, frame, bad_data, verify_decode)
    record = {"video_id": plan.video_id, "frame": frame, "has_face": image is not None,
              "image": image or b""}
    for key, values in labels.items():
      record[key] = values[frame - 1]
    yield record


def video_record(plan: VideoPlan, bad_data: BadDataLog, verify_decode: bool) -> dict:
  """The `videos` record of one video (faces checked exactly as for `frames`, so both agree)."""
  has_face = np.array(
      [load_face(plan, frame, bad_data, verify_decode) is not None
       for frame in range(1, plan.num_frames + 1)], bool)
  labelled_tasks = plan.listed_tasks if plan.listed_tasks else tuple(plan.labels)
  return {
      "video_id": plan.video_id,
      "num_frames": plan.num_frames,
      "has_face": has_face,
      **label_arrays(plan),
      **{f"labels_{task}": task in labelled_tasks for task in schema.TASKS},
  }
