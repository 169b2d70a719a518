"""Where things are in a user's Aff-Wild2 copy (the layout ABAW participants receive)."""

from __future__ import annotations

import dataclasses

from absl import logging
from etils import epath

from affect_jax.data.builders.bad_data import BadDataLog, LayoutError

IMAGE_ROOTS = ("cropped_aligned", "cropped_aligned_new_50_vids")
# Newest release first: when several are present the newest is used.
ANNOTATION_ROOTS = (
    "8th_ABAW_Annotations", "6th_ABAW_Annotations", "5th_ABAW_Annotations", "Third ABAW Annotations"
)
TASK_FOLDERS = {
    "va": ("VA_Estimation_Challenge",),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),
    "au": ("AU_Detection_Challenge",),
}
SPLIT_FOLDERS = {"train": "Train_Set", "validation": "Validation_Set"}
TEST_LIST_FOLDER = "names_of_videos_in_each_test_set"
TEST_LISTS = {
    "va": "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
    "expr": "Expression_Recognition_Challenge_test_set_release.txt",
    "au": "Action_Unit_Detection_Challenge_test_set_release.txt",
}
IMAGE_SUFFIX = ".jpg"

EXPECTED_LAYOUT = """\
<manual_dir>/
  cropped_aligned/<video>/00001.jpg ...           aligned faces, 1-based frame numbers
  cropped_aligned_new_50_vids/<video>/...         optional second batch, same layout
  6th_ABAW_Annotations/                           or 8th_ABAW_Annotations, 5th_ABAW_Annotations,
                                                  "Third ABAW Annotations"
    VA_Estimation_Challenge/{Train_Set,Validation_Set}/<video>.txt
    EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<video>.txt
                                                  (older releases: EXPR_Classification_Challenge)
    AU_Detection_Challenge/{Train_Set,Validation_Set}/<video>.txt
  names_of_videos_in_each_test_set/               optional; without it there is no test split
    Valence_Arousal_Estimation_Challenge_test_set_release.txt
    Expression_Recognition_Challenge_test_set_release.txt
    Action_Unit_Detection_Challenge_test_set_release.txt
<video> is e.g. 1-30-1280x720 or 10-60-1280x720_left (_left/_right: one of two faces in a video)."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """The folders and files found under the manual dir."""

  root: epath.Path
  image_dirs: dict[str, epath.Path]   # video id -> folder of its face images
  annotation_root: epath.Path
  task_dirs: dict[str, epath.Path]    # task -> challenge folder
  test_lists: dict[str, epath.Path]   # task -> test-set list file (only those present)


def _layout_error(problem: str) -> LayoutError:
  return LayoutError(f"{problem}\nExpected Aff-Wild2 layout:\n{EXPECTED_LAYOUT}")


def find_image_dirs(root: epath.Path, bad_data: BadDataLog) -> dict[str, epath.Path]:
  """Video id -> its face-image folder, over every image root present."""
  roots = [root / name for name in IMAGE_ROOTS if (root / name).is_dir()]
  if not roots:
    raise _layout_error(f"no face image folder ({' or '.join(IMAGE_ROOTS)}) in {root}")
  image_dirs: dict[str, epath.Path] = {}
  for image_root in roots:
    for video_dir in sorted(image_root.iterdir()):
      if not video_dir.is_dir():
        continue
      if video_dir.name in image_dirs:
        bad_data.report(video_dir, None, f"video folder also exists as {image_dirs[video_dir.name]}"
                        " (the first one is used when skipping)")
        continue
      image_dirs[video_dir.name] = video_dir
  return image_dirs


def find_annotation_root(root: epath.Path) -> epath.Path:
  """The newest annotation release folder present."""
  present = [root / name for name in ANNOTATION_ROOTS if (root / name).is_dir()]
  if not present:
    raise _layout_error(f"no annotation folder ({', '.join(ANNOTATION_ROOTS)}) in {root}")
  if len(present) > 1:
    logging.warning("Several annotation releases in %s; using %s", root, present[0].name)
  return present[0]


def find_task_dirs(annotation_root: epath.Path) -> dict[str, epath.Path]:
  """Task -> its challenge folder (first name present of TASK_FOLDERS[task])."""
  task_dirs = {}
  for task, names in TASK_FOLDERS.items():
    present = [annotation_root / name for name in names if (annotation_root / name).is_dir()]
    if not present:
      raise _layout_error(f"missing annotation folder {' or '.join(names)} in {annotation_root}")
    task_dirs[task] = present[0]
  return task_dirs


def find_test_lists(root: epath.Path) -> dict[str, epath.Path]:
  """Task -> test-set list file, for those present; empty without the test-list folder."""
  folder = root / TEST_LIST_FOLDER
  if not folder.is_dir():
    return {}
  lists = {task: folder / name for task, name in TEST_LISTS.items() if (folder / name).is_file()}
  if not lists:
    raise _layout_error(f"{folder} contains none of {', '.join(TEST_LISTS.values())}")
  return lists


def find_layout(root: epath.PathLike, bad_data: BadDataLog) -> Layout:
  """Locates everything under ``root``; LayoutError (showing EXPECTED_LAYOUT) when incomplete."""
  root = epath.Path(root)
  if not root.is_dir():
    raise _layout_error(f"Aff-Wild2 manual dir {root} does not exist")
  annotation_root = find_annotation_root(root)
  return Layout(
      root=root,
      image_dirs=find_image_dirs(root, bad_data),
      annotation_root=annotation_root,
      task_dirs=find_task_dirs(annotation_root),
      test_lists=find_test_lists(root),
  )


def annotation_files(task_dir: epath.Path, split: str) -> dict[str, epath.Path]:
  """Video id -> annotation file of one task in one split (``split`` in SPLIT_FOLDERS)."""
  folder = task_dir / SPLIT_FOLDERS[split]
  if not folder.is_dir():
    raise _layout_error(f"missing annotation folder {folder}")
  return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix == ".txt"}


def face_image_paths(video_dir: epath.Path, bad_data: BadDataLog) -> dict[int, epath.Path]:
  """1-based frame number -> face image path, for the ``*.jpg`` files of one video folder."""
  paths = {}
  ignored = []
  for path in sorted(video_dir.iterdir()):
    if path.suffix != IMAGE_SUFFIX:
      if not path.name.startswith("."):
        ignored.append(path.name)
      continue
    if not path.stem.isdigit() or int(path.stem) < 1:
      bad_data.report(path, None, "face image name is not a 1-based frame number like 00001.jpg")
      continue
    if int(path.stem) in paths:
      bad_data.report(path, None, f"same frame number as {paths[int(path.stem)].name}")
      continue
    paths[int(path.stem)] = path
  if ignored:
    logging.warning("Ignoring %d non-%s file(s) in %s, e.g. %s",
                    len(ignored), IMAGE_SUFFIX, video_dir, sorted(ignored)[0])
  return paths
