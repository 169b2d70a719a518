"""TFDS builders built from small hand-written copies of each dataset's layout.

Every expected label below comes from the Python lists the fixture writes into the files, never
from the parser; every record of every split is compared.
"""

import csv
import io
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from affect_jax.data import builders, labels, schema
from affect_jax.data.builders.bad_data import BadDataError, LayoutError, image_problem, jpeg_problem

V = "valence,arousal"
E = ",".join(schema.EXPR_CLASSES)
A = ",".join(schema.AU_NAMES)
HEADERS = {"va": V, "expr": E, "au": A}
TASK_DIRS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Recognition_Challenge",
             "au": "AU_Detection_Challenge"}
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
TEST_LISTS = {"va": "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
              "expr": "Expression_Recognition_Challenge_test_set_release.txt",
              "au": "Action_Unit_Detection_Challenge_test_set_release.txt"}
INVALID_ROW = {"va": (-5, -5), "expr": -1, "au": (-1,) * 12}


def jpeg_bytes(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG")
  return buffer.getvalue()


def write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode())


def format_rows(task, rows):
  if task == "expr":
    return [str(row) for row in rows]
  return [",".join(str(value) for value in row) for row in rows]


class AffWild2Copy:
  """Writes an Aff-Wild2 manual dir and remembers what every frame should read back as."""

  def __init__(self, root, annotation_root="6th_ABAW_Annotations",
               expr_folder="EXPR_Recognition_Challenge"):
    self.root = str(root)
    self.annotations = os.path.join(self.root, annotation_root)
    self.task_dirs = {**TASK_DIRS, "expr": expr_folder}
    self.images = {}   # video -> {frame: bytes}
    self.labels = {}   # (split, video) -> {task: rows}
    self.listed = {}   # video -> [tasks]
    for task_dir in self.task_dirs.values():
      for split_dir in SPLIT_DIRS.values():
        os.makedirs(os.path.join(self.annotations, task_dir, split_dir), exist_ok=True)

  def add_images(self, video, frames, image_root="cropped_aligned"):
    self.images[video] = {}
    for frame in frames:
      data = jpeg_bytes(hash((video, frame)) % 1000)
      write(os.path.join(self.root, image_root, video, f"{frame:05d}.jpg"), data)
      self.images[video][frame] = data

  def annotation_path(self, task, split, video):
    return os.path.join(self.annotations, self.task_dirs[task], SPLIT_DIRS[split], f"{video}.txt")

  def add_labels(self, task, split, video, rows, header=True, newline="\n", final_newline=True):
    lines = ([HEADERS[task]] if header else []) + format_rows(task, rows)
    text = newline.join(lines) + (newline if final_newline else "")
    write(self.annotation_path(task, split, video), text)
    self.labels.setdefault((split, video), {})[task] = rows

  def add_test_list(self, task, videos, newline="\n"):
    write(os.path.join(self.root, "names_of_videos_in_each_test_set", TEST_LISTS[task]),
          newline.join(videos) + newline)
    for video in videos:
      self.listed.setdefault(video, []).append(task)

  def expected_videos(self, split):
    """video -> expected `videos` record, computed from what was written."""
    if split == "test":
      videos = {video: {} for video in self.listed}
    else:
      videos = {video: tasks for (s, video), tasks in self.labels.items() if s == split}
    expected = {}
    for video in sorted(videos):
      tasks = videos[video]
      frames = max([len(rows) for rows in tasks.values()] + list(self.images[video]))
      record = {"video_id": video, "num_frames": frames,
                "has_face": np.array([k in self.images[video] for k in range(1, frames + 1)])}
      for task in schema.TASKS:
        rows = list(tasks.get(task, []))
        rows += [INVALID_ROW[task]] * (frames - len(rows))
        valid = np.array([row != INVALID_ROW[task] for row in rows])
        dtype = np.float32 if task == "va" else np.int32
        values = np.array([row if ok else INVALID_ROW[task] for row, ok in zip(rows, valid)], dtype)
        if task == "au":
          valid = np.array([-1 not in row for row in rows])
          values[~valid] = -1
        record[task], record[f"{task}_valid"] = values, valid
        record[f"labels_{task}"] = (task in self.listed.get(video, [])) if split == "test" else task in tasks
      expected[video] = record
    return expected


def records(builder, split):
  return list(builder.as_data_source(split))


def assert_video_matches(record, expected):
  assert record["video_id"].decode() == expected["video_id"]
  for key in schema.VIDEO_KEYS[1:]:
    np.testing.assert_array_equal(record[key], expected[key], err_msg=f"{expected['video_id']} {key}")


def assert_frames_match(frame_records, expected_videos, copy):
  """Frames in (video_id, frame) order, each equal to the expected per-video arrays."""
  expected_order = [(video, k) for video, e in expected_videos.items()
                    for k in range(1, e["num_frames"] + 1)]
  assert [(r["video_id"].decode(), r["frame"]) for r in frame_records] == expected_order
  for r in frame_records:
    video, k = r["video_id"].decode(), r["frame"]
    e = expected_videos[video]
    assert r["has_face"] == e["has_face"][k - 1]
    assert r["image"] == copy.images[video].get(k, b"")
    for task in schema.TASKS:
      np.testing.assert_array_equal(r[task], e[task][k - 1], err_msg=f"{video} {k} {task}")
      assert r[f"{task}_valid"] == e[f"{task}_valid"][k - 1]


# ---------------------------------------------------------------------------------------------
# One copy with every quirk at once.

VA_ROWS = [(0.25, -0.5), (-5, -5), (1, -1), (0.125, 0.75), (-0.3, 0.3), (0.0, 0.9)]
EXPR_ROWS = [3, -1, 7, 0]
AU_ROWS = [(1, 0) * 6, (0,) * 11 + (-1,), (1,) * 12, (0, 1) * 6]


def quirky_copy(root):
  copy = AffWild2Copy(root)
  # More annotation lines (6) than images (max 5), frame 3 without a face; VA with header and LF,
  # EXPR without header, CRLF and no final newline.
  copy.add_images("1-30-1280x720", [1, 2, 4, 5])
  copy.add_labels("va", "train", "1-30-1280x720", VA_ROWS)
  copy.add_labels("expr", "train", "1-30-1280x720", EXPR_ROWS, header=False, newline="\r\n",
                  final_newline=False)
  # Two faces of one video, each its own sequence with its own folder; more images than lines.
  copy.add_images("10-60-1280x720_left", range(1, 7))
  copy.add_labels("au", "train", "10-60-1280x720_left", AU_ROWS)
  copy.add_images("10-60-1280x720_right", range(1, 4))
  copy.add_labels("va", "train", "10-60-1280x720_right", VA_ROWS[:3], newline="\r\n")
  # Second image folder; VA in Train_Set and AU in Validation_Set (5 lines, 4 images).
  copy.add_images("122-60-1920x1080-5", range(1, 5), "cropped_aligned_new_50_vids")
  copy.add_labels("va", "train", "122-60-1920x1080-5", VA_ROWS[2:6])
  copy.add_labels("au", "validation", "122-60-1920x1080-5", AU_ROWS + [(0,) * 12], header=False)
  copy.add_images("5-60-1920x1080-1", [1, 2])
  copy.add_labels("expr", "validation", "5-60-1920x1080-1", [6, 5], final_newline=False)
  # Test videos: images only.
  copy.add_images("2-30-640x360", [1, 2, 3])
  copy.add_images("3-25-1920x1080", [2, 3], "cropped_aligned_new_50_vids")
  copy.add_test_list("va", ["2-30-640x360"])
  copy.add_test_list("expr", ["2-30-640x360"], newline="\r\n")
  copy.add_test_list("au", ["3-25-1920x1080"])
  return copy


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
  root = tmp_path_factory.mktemp("affwild2")
  copy = quirky_copy(root / "manual")
  built = {config: builders.build("affwild2", copy.root, root / "tfds", config)
           for config in ("frames", "videos")}
  return copy, built


def test_quirky_copy_expected_shape_sanity(quirky):
  copy, _ = quirky
  # Guards the test's own bookkeeping against silently testing less than intended.
  train = copy.expected_videos("train")
  assert {v: e["num_frames"] for v, e in train.items()} == {
      "1-30-1280x720": 6, "10-60-1280x720_left": 6, "10-60-1280x720_right": 3,
      "122-60-1920x1080-5": 4}
  assert copy.expected_videos("validation")["122-60-1920x1080-5"]["num_frames"] == 5


def test_affwild2_frames_every_record_matches_the_files(quirky):
  copy, built = quirky
  builder = built["frames"]
  assert set(builder.info.splits) == {"train", "validation", "test"}
  counts = {}
  for split in ("train", "validation", "test"):
    expected = copy.expected_videos(split)
    frame_records = records(builder, split)
    assert_frames_match(frame_records, expected, copy)
    counts[split] = len(frame_records)
  assert counts == {"train": 6 + 6 + 3 + 4, "validation": 5 + 2, "test": 3 + 3}


def test_affwild2_videos_every_record_matches_the_files(quirky):
  copy, built = quirky
  for split in ("train", "validation", "test"):
    expected = copy.expected_videos(split)
    video_records = records(built["videos"], split)
    assert [r["video_id"].decode() for r in video_records] == list(expected)
    for record in video_records:
      assert_video_matches(record, expected[record["video_id"].decode()])


def test_affwild2_split_specific_labels_and_test_flags(quirky):
  _, built = quirky
  train = {r["video_id"].decode(): r for r in records(built["videos"], "train")}
  validation = {r["video_id"].decode(): r for r in records(built["videos"], "validation")}
  test = {r["video_id"].decode(): r for r in records(built["videos"], "test")}
  both = "122-60-1920x1080-5"
  assert (train[both]["labels_va"], train[both]["labels_au"]) == (True, False)
  assert (validation[both]["labels_va"], validation[both]["labels_au"]) == (False, True)
  assert not train[both]["au_valid"].any() and not validation[both]["va_valid"].any()
  assert [(r["labels_va"], r["labels_expr"], r["labels_au"]) for r in test.values()] == [
      (True, True, False), (False, False, True)]
  for r in test.values():
    assert not (r["va_valid"].any() or r["expr_valid"].any() or r["au_valid"].any())


def test_affwild2_metadata_and_default_file_format(quirky):
  _, built = quirky
  info = built["frames"].info
  assert info.file_format.value == "array_record"
  assert info.metadata["annotation_root"] == "6th_ABAW_Annotations"
  assert info.metadata["bad_data"] == {"policy": "error", "num_skipped": 0, "skipped": []}
  files = os.listdir(built["frames"].data_dir)
  assert any(name.startswith("affwild2-train.array_record") for name in files)


def test_affwild2_readable_with_tfds_data_source(quirky):
  copy, built = quirky
  source = tfds.data_source("affwild2/frames", split="validation",
                            data_dir=os.path.dirname(os.path.dirname(os.path.dirname(built["frames"].data_dir))))
  assert len(source) == 7 and source[4]["frame"] == 5 and not source[4]["has_face"]


def test_tfds_build_command_line_code_path(quirky, tmp_path):
  """The `tfds build <folder>` command's own loader and build routine, skip policy via --config."""
  from tensorflow_datasets.scripts.cli import build as cli_build  # pylint: disable=g-import-not-at-top
  import simple_parsing  # pylint: disable=g-import-not-at-top
  copy, _ = quirky
  folder = os.path.dirname(builders.builder_class("affwild2").code_path)
  config = json.dumps({"name": "videos_skip", "view": "videos", "bad_data": "skip"})
  args = simple_parsing.parse(cli_build.Args, args=[
      folder, f"--manual_dir={copy.root}", f"--data_dir={tmp_path}", f"--config={config}"])
  args.execute()
  builder = tfds.builder_from_directory(tmp_path / "affwild2" / "videos_skip" / "1.0.0")
  assert builder.info.file_format.value == "array_record"
  assert builder.info.metadata["bad_data"]["policy"] == "skip"
  expected = copy.expected_videos("train")
  for record in builder.as_data_source("train"):
    assert_video_matches(record, expected[record["video_id"].decode()])


# ---------------------------------------------------------------------------------------------
# Release variants.

@pytest.mark.parametrize("annotation_root, expr_folder", [
    ("6th_ABAW_Annotations", "EXPR_Recognition_Challenge"),
    ("5th_ABAW_Annotations", "EXPR_Classification_Challenge"),
    ("8th_ABAW_Annotations", "EXPR_Recognition_Challenge"),
    ("Third ABAW Annotations", "EXPR_Classification_Challenge"),
])
def test_affwild2_annotation_root_and_expr_folder_names(tmp_path, annotation_root, expr_folder):
  copy = AffWild2Copy(tmp_path / "manual", annotation_root, expr_folder)
  copy.add_images("7-25-1280x720", [1, 2, 3])
  copy.add_labels("expr", "train", "7-25-1280x720", [4, -1, 2])
  copy.add_images("8-25-1280x720", [1])
  copy.add_labels("va", "validation", "8-25-1280x720", [(0.5, 0.5)])
  builder = builders.build("affwild2", copy.root, tmp_path / "tfds", "videos")
  assert set(builder.info.splits) == {"train", "validation"}  # no test lists, no test split
  assert builder.info.metadata["annotation_root"] == annotation_root
  assert builder.info.metadata["task_folders"]["expr"] == expr_folder
  for split in ("train", "validation"):
    expected = copy.expected_videos(split)
    (record,) = records(builder, split)
    assert_video_matches(record, expected[record["video_id"].decode()])


# ---------------------------------------------------------------------------------------------
# Bad input: raise naming file (and line), or skip + count + log when asked.

def small_copy(root):
  copy = AffWild2Copy(root)
  copy.add_images("1-30-1280x720", [1, 2, 3])
  copy.add_labels("va", "train", "1-30-1280x720", [(0.1, 0.2), (0.3, 0.4), (0.5, 0.6)])
  copy.add_images("2-30-1280x720", [1, 2])
  copy.add_labels("expr", "validation", "2-30-1280x720", [1, 2])
  return copy


def replace_line(path, line, text):
  with open(path) as f:
    lines = f.read().splitlines()
  lines[line - 1] = text
  write(path, "\n".join(lines) + "\n")


# name -> (corrupt(copy) -> (file, line), problem text, check_skipped(train records))
BAD_ANNOTATION_LINES = {
    "wrong field count": ("0.1,0.2,0.3", "expected 2 comma-separated field(s)"),
    "non-number": ("0.1,zero", "arousal field 'zero' is not a number"),
    "va out of range": ("0.1,1.5", "arousal 1.5 outside [-1, 1] and not the invalid marker -5"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATION_LINES))
def test_affwild2_bad_annotation_line(tmp_path, case, caplog):
  text, problem = BAD_ANNOTATION_LINES[case]
  copy = small_copy(tmp_path / "manual")
  path = copy.annotation_path("va", "train", "1-30-1280x720")
  replace_line(path, 3, text)  # header is line 1, so this is frame 2
  with pytest.raises(BadDataError) as error:
    builders.build("affwild2", copy.root, tmp_path / "strict", "frames")
  assert f"{path}:3: {problem}" in str(error.value)
  with caplog.at_level(logging.WARNING):
    builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "frames", bad_data="skip")
  summary = builder.info.metadata["bad_data"]
  assert summary["num_skipped"] == 1 and summary["skipped"][0].startswith(f"{path}:3: {problem}")
  assert any(f"{path}:3" in r.getMessage() for r in caplog.records)
  train = records(builder, "train")
  assert [r["va_valid"] for r in train] == [True, False, True]
  np.testing.assert_array_equal(train[2]["va"], np.float32([0.5, 0.6]))


@pytest.mark.parametrize("task, bad_row, problem", [
    ("expr", "8", "expression value 8 not in 0..7 and not the invalid marker -1"),
    ("au", "0,0,0,0,0,0,0,0,0,0,0,3", "AU26 value 3 not in 0..1 and not the invalid marker -1"),
])
def test_affwild2_class_value_out_of_range(tmp_path, task, bad_row, problem):
  copy = small_copy(tmp_path / "manual")
  path = copy.annotation_path(task, "validation", "3-30-1280x720")
  copy.add_images("3-30-1280x720", [1, 2])
  good = [0] if task == "expr" else [(0,) * 12]
  copy.add_labels(task, "validation", "3-30-1280x720", good * 2)
  replace_line(path, 2, bad_row)
  with pytest.raises(BadDataError, match=f"{path}:2: {problem}"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  assert builder.info.metadata["bad_data"]["num_skipped"] == 1
  record = [r for r in records(builder, "validation") if r["video_id"] == b"3-30-1280x720"][0]
  np.testing.assert_array_equal(record[f"{task}_valid"], [False, True])


def test_affwild2_empty_annotation_file(tmp_path):
  copy = small_copy(tmp_path / "manual")
  path = copy.annotation_path("au", "train", "1-30-1280x720")
  write(path, "")
  with pytest.raises(BadDataError, match=f"{path}: empty annotation file"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  assert builder.info.metadata["bad_data"]["num_skipped"] == 1
  (record,) = records(builder, "train")
  assert (record["labels_va"], record["labels_au"]) == (True, False)


@pytest.mark.parametrize("case, data, problem", [
    ("zero-byte", b"", "zero-byte image file"),
    ("truncated", jpeg_bytes(1)[:200], "truncated JPEG"),
    ("not jpeg", b"\x89PNG\r\n\x1a\n" + b"0" * 50, "not JPEG data"),
])
def test_affwild2_bad_face_image(tmp_path, case, data, problem):
  copy = small_copy(tmp_path / "manual")
  path = os.path.join(copy.root, "cropped_aligned", "1-30-1280x720", "00002.jpg")
  write(path, data)
  for config in ("frames", "videos"):
    with pytest.raises(BadDataError, match=f"{path}: {problem}"):
      builders.build("affwild2", copy.root, tmp_path / f"strict_{config}", config)
  frames = builders.build("affwild2", copy.root, tmp_path / "lenient", "frames", bad_data="skip")
  videos = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  for builder in (frames, videos):
    summary = builder.info.metadata["bad_data"]
    assert summary["num_skipped"] == 1 and summary["skipped"][0].startswith(f"{path}: {problem}")
  train = records(frames, "train")
  assert [r["has_face"] for r in train] == [True, False, True] and train[1]["image"] == b""
  np.testing.assert_array_equal(records(videos, "train")[0]["has_face"], [True, False, True])


def test_affwild2_verify_decode_catches_what_markers_cannot(tmp_path):
  copy = small_copy(tmp_path / "manual")
  path = os.path.join(copy.root, "cropped_aligned", "1-30-1280x720", "00003.jpg")
  data = jpeg_bytes(3)
  write(path, data[:len(data) // 2] + b"\xff\xd9")  # cut in the middle, end marker re-added
  builders.build("affwild2", copy.root, tmp_path / "markers", "videos")
  with pytest.raises(BadDataError, match=f"{path}: cannot be decoded"):
    builders.build("affwild2", copy.root, tmp_path / "decode", "videos", verify_decode=True)


def test_affwild2_annotated_video_without_image_folder(tmp_path):
  copy = small_copy(tmp_path / "manual")
  copy.images["4-30-1280x720"] = {}
  copy.add_labels("va", "train", "4-30-1280x720", [(0.0, 0.0)])
  path = copy.annotation_path("va", "train", "4-30-1280x720")
  with pytest.raises(BadDataError, match=f"{path}: video 4-30-1280x720 has no face image folder"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  assert [r["video_id"] for r in records(builder, "train")] == [b"1-30-1280x720"]
  assert builder.info.metadata["bad_data"]["num_skipped"] == 1


def test_affwild2_test_list_names_unknown_video(tmp_path):
  copy = small_copy(tmp_path / "manual")
  copy.add_images("9-30-1280x720", [1])
  copy.add_test_list("au", ["9-30-1280x720", "missing-video"])
  path = os.path.join(copy.root, "names_of_videos_in_each_test_set", TEST_LISTS["au"])
  with pytest.raises(BadDataError, match=f"{path}:2: video missing-video has no face image folder"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  assert [r["video_id"] for r in records(builder, "test")] == [b"9-30-1280x720"]


def test_affwild2_missing_manual_dir(tmp_path):
  with pytest.raises(LayoutError, match=f"(?s){tmp_path / 'nowhere'}.*cropped_aligned"):
    builders.build("affwild2", tmp_path / "nowhere", tmp_path / "tfds", "frames")


@pytest.mark.parametrize("remove, problem", [
    ("6th_ABAW_Annotations", "no annotation folder"),
    ("6th_ABAW_Annotations/AU_Detection_Challenge", "missing annotation folder AU_Detection_Challenge"),
    ("6th_ABAW_Annotations/VA_Estimation_Challenge/Validation_Set", "missing annotation folder"),
    ("cropped_aligned", "no face image folder"),
])
def test_affwild2_missing_folder_shows_expected_layout(tmp_path, remove, problem):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = small_copy(tmp_path / "manual")
  shutil.rmtree(os.path.join(copy.root, remove))
  with pytest.raises(LayoutError) as error:
    builders.build("affwild2", copy.root, tmp_path / "tfds", "frames")
  message = str(error.value)
  assert problem in message and "Expected Aff-Wild2 layout" in message
  assert "EXPR_Classification_Challenge" in message  # the layout text itself is shown


def test_build_reuses_an_existing_dataset_unless_overwrite(tmp_path):
  copy = small_copy(tmp_path / "manual")
  builders.build("affwild2", copy.root, tmp_path / "tfds", "videos")
  copy.add_labels("va", "train", "1-30-1280x720", [(0.9, 0.9), (0.3, 0.4), (0.5, 0.6)])
  reused = builders.build("affwild2", copy.root, tmp_path / "tfds", "videos")
  np.testing.assert_array_equal(records(reused, "train")[0]["va"][0], np.float32([0.1, 0.2]))
  rebuilt = builders.build("affwild2", copy.root, tmp_path / "tfds", "videos", overwrite=True)
  np.testing.assert_array_equal(records(rebuilt, "train")[0]["va"][0], np.float32([0.9, 0.9]))


def test_bad_data_policy_is_validated(tmp_path):
  with pytest.raises(ValueError, match="bad_data must be one of"):
    builders.build("affwild2", tmp_path, tmp_path / "tfds", "frames", bad_data="ignore")


# ---------------------------------------------------------------------------------------------
# Image checks and the label table.

def test_image_checks():
  good = jpeg_bytes(5)
  assert jpeg_problem(good) is None and jpeg_problem(good, verify_decode=True) is None
  assert jpeg_problem(good + b"\x00\x00") is None  # zero padding after the end marker
  assert jpeg_problem(b"") == "zero-byte image file"
  assert "truncated JPEG" in jpeg_problem(good[:-1])
  assert "not JPEG data" in jpeg_problem(b"GIF89a....")
  png = io.BytesIO()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, "PNG")
  assert image_problem(png.getvalue()) is None
  assert "truncated PNG" in image_problem(png.getvalue()[:-4])
  assert "cannot be decoded" in image_problem(b"BM not really a bitmap")


def test_label_table_maps_each_name_to_the_same_affwild2_class():
  synonyms = {"angry": "Anger", "happy": "Happiness", "sad": "Sadness", "contempt": "Other"}
  for dataset, table in labels.EXPRESSION_TABLE.items():
    for code, (name, index) in table.items():
      if index == labels.NO_LABEL:
        assert name.lower() in ("none", "uncertain", "non-face", "unknown", "nf"), (dataset, name)
        continue
      target = synonyms.get(name.lower(), name.capitalize())
      assert schema.EXPR_CLASSES[index] == target, (dataset, code, name)
      assert labels.to_affwild2(dataset, code) == index
  assert len({i for _, i in labels.EXPRESSION_TABLE["rafdb"].values()}) == 7
  with pytest.raises(ValueError, match="rafdb has no expression code 0"):
    labels.to_affwild2("rafdb", 0)


# ---------------------------------------------------------------------------------------------
# Face-image datasets.

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                    "expression,valence,arousal")


def affectnet_row(path, code, valence, arousal, box=(10, 12, 80, 81)):
  return f"{path},{box[0]},{box[1]},{box[2]},{box[3]},1.5;2.5;3.5,{code},{valence},{arousal}"


def write_affectnet(root):
  """Writes training.csv (with header) and validation.csv (without); returns expected records."""
  rows = {"train": [("1/a.jpg", 0, 0.5, -0.25), ("1/b.jpg", 7, -0.75, 0.5),
                    ("2/c.png", 8, -2, -2), ("2/d.jpg", 10, -2, -2)],
          "validation": [("3/e.jpg", 6, 1, -1), ("3/f.jpg", 1, 0.1, 0.2)]}
  expected = {}
  for split, name in (("train", "training.csv"), ("validation", "validation.csv")):
    lines = [AFFECTNET_HEADER] if split == "train" else []
    expected[split] = []
    for index, (path, code, valence, arousal) in enumerate(rows[split]):
      if path.endswith(".png"):
        buffer = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), index, np.uint8)).save(buffer, "PNG")
        data = buffer.getvalue()
      else:
        data = jpeg_bytes(index + 10 * len(lines))
      write(os.path.join(root, "Manually_Annotated_Images", path), data)
      lines.append(affectnet_row(path, code, valence, arousal))
      mapped = {0: 0, 7: 7, 8: -1, 10: -1, 6: 1, 1: 4}[code]
      va_valid = valence != -2
      expected[split].append({"image": data, "expression": mapped, "has_label": mapped != -1,
                              "source_label": code, "source": path.encode(),
                              "va": np.float32([valence, arousal]), "va_valid": va_valid,
                              "face_box": np.int32([10, 12, 80, 81])})
    write(os.path.join(root, name), "\n".join(lines) + "\n")
  return expected


def assert_records_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert set(a) == set(e)
    for key in e:
      np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def test_affectnet_every_record(tmp_path):
  expected = write_affectnet(tmp_path / "manual")
  builder = builders.build("affectnet", tmp_path / "manual", tmp_path / "tfds")
  assert set(builder.info.splits) == {"train", "validation"}
  for split in ("train", "validation"):
    assert_records_equal(records(builder, split), expected[split])


def test_affectnet_bad_row_and_missing_image(tmp_path):
  write_affectnet(tmp_path / "manual")
  csv_path = tmp_path / "manual" / "training.csv"
  lines = csv_path.read_text().splitlines()
  lines[2] = affectnet_row("1/b.jpg", 11, 0.0, 0.0)
  lines[3] = lines[3].replace(",-2,-2", ",-2")
  csv_path.write_text("\n".join(lines + [affectnet_row("9/missing.jpg", 1, 0, 0)]) + "\n")
  with pytest.raises(BadDataError, match=f"{csv_path}:3: expression 11 not in 0..10"):
    builders.build("affectnet", tmp_path / "manual", tmp_path / "strict")
  builder = builders.build("affectnet", tmp_path / "manual", tmp_path / "lenient", bad_data="skip")
  skipped = builder.info.metadata["bad_data"]["skipped"]
  assert skipped[0].startswith(f"{csv_path}:3: expression 11")
  assert skipped[1].startswith(f"{csv_path}:4: expected 9 fields, found 8")
  missing = tmp_path / "manual" / "Manually_Annotated_Images" / "9" / "missing.jpg"
  assert skipped[2].startswith(f"{missing}: image file does not exist (listed at {csv_path}:6)")
  assert [r["source"] for r in records(builder, "train")] == [b"1/a.jpg", b"2/d.jpg"]


def test_rafdb_every_record(tmp_path):
  root = tmp_path / "manual"
  entries = [("train_00001.jpg", 5), ("test_0001.jpg", 1), ("train_00002.jpg", 7), ("test_0002.jpg", 6)]
  expected = {"train": [], "test": []}
  for index, (name, code) in enumerate(entries):
    data = jpeg_bytes(index)
    relative = f"Image/aligned/{name[:-4]}_aligned.jpg"
    write(os.path.join(root, relative), data)
    mapped = {5: 5, 1: 6, 7: 0, 6: 1}[code]
    expected[name.split("_")[0]].append({"image": data, "expression": mapped, "has_label": True,
                                         "source_label": code, "source": relative.encode()})
  write(os.path.join(root, "EmoLabel/list_patition_label.txt"),
        "\r\n".join(f"{n} {c}" for n, c in entries))
  builder = builders.build("rafdb", root, tmp_path / "tfds")
  for split in ("train", "test"):
    assert_records_equal(records(builder, split), expected[split])
  write(os.path.join(root, "EmoLabel/list_patition_label.txt"), "train_00001.jpg 5\nval_1.jpg 2\n")
  with pytest.raises(BadDataError, match="list_patition_label.txt:2: image name 'val_1.jpg'"):
    builders.build("rafdb", root, tmp_path / "strict")


def fer_rows(count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (48, 48)).astype(np.uint8) for _ in range(count)]


def write_fer2013(path, emotions, usages, pixels):
  lines = ["emotion,pixels,Usage"]
  lines += [f"{e},{' '.join(map(str, p.ravel()))},{u}" for e, u, p in zip(emotions, usages, pixels)]
  write(path, "\n".join(lines) + "\n")


USAGES = ["Training", "PublicTest", "Training", "PrivateTest", "Training"]


def decode(png):
  return np.asarray(Image.open(io.BytesIO(png)))


def test_fer2013_every_record(tmp_path):
  pixels = fer_rows(5)
  emotions = [0, 3, 6, 5, 2]
  write_fer2013(tmp_path / "manual" / "fer2013.csv", emotions, USAGES, pixels)
  builder = builders.build("fer2013", tmp_path / "manual", tmp_path / "tfds")
  mapping = {0: 1, 3: 4, 6: 0, 5: 6, 2: 3}
  for split, usage in (("train", "Training"), ("validation", "PublicTest"), ("test", "PrivateTest")):
    rows = [i for i, u in enumerate(USAGES) if u == usage]
    got = records(builder, split)
    assert [r["source"] for r in got] == [f"fer2013.csv:{i + 2}".encode() for i in rows]
    for r, i in zip(got, rows):
      np.testing.assert_array_equal(decode(r["image"]), pixels[i])
      assert (r["expression"], r["source_label"], r["has_label"]) == (mapping[emotions[i]], emotions[i], True)


def test_fer2013_bad_pixels(tmp_path):
  path = tmp_path / "manual" / "fer2013.csv"
  write_fer2013(path, [0, 1], ["Training", "Training"], fer_rows(2))
  lines = path.read_text().splitlines()
  lines[2] = lines[2].replace(" ", " 300 ", 1)
  path.write_text("\n".join(lines + ["1,0 0,PublicTest"]) + "\n")
  with pytest.raises(BadDataError, match=f"{path}:3: pixels has 2305 values, expected 2304"):
    builders.build("fer2013", tmp_path / "manual", tmp_path / "strict")


VOTES = [
    ([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0),     # unanimous neutral
    ([0, 0, 0, 0, 4, 1, 3, 0, 1, 1], 4, 1),      # singles dropped: anger 4 of 7 -> Anger
    ([0, 5, 5, 0, 0, 0, 0, 0, 0, 0], -1, -1),    # tie, no strict majority
    ([0, 0, 0, 0, 0, 0, 0, 6, 2, 2], 7, 7),      # contempt -> Other
    ([0, 0, 0, 0, 0, 0, 0, 0, 8, 2], 8, -1),     # majority unknown -> no label
]


def test_ferplus_every_record(tmp_path):
  root = tmp_path / "manual"
  pixels = fer_rows(6, seed=1)
  usages = USAGES + ["Training"]
  write_fer2013(root / "fer2013.csv", [0] * 6, usages, pixels)
  names = ["fer0000000.png", "fer0000001.png", "", "fer0000003.png", "fer0000004.png", "fer0000005.png"]
  votes = [VOTES[0][0], VOTES[1][0], [0] * 10, VOTES[2][0], VOTES[3][0], VOTES[4][0]]
  lines = ["Usage,Image name," + ",".join(labels.FERPLUS_VOTE_COLUMNS)]
  lines += [f"{u},{n}," + ",".join(map(str, v)) for u, n, v in zip(usages, names, votes)]
  write(root / "fer2013new.csv", "\r\n".join(lines) + "\r\n")
  builder = builders.build("ferplus", root, tmp_path / "tfds")
  assert builder.info.metadata["empty_image_name_rows"] == 1
  expected_rows = {"train": [0, 4, 5], "validation": [1], "test": [3]}  # row 2 has no name
  vote_case = {0: VOTES[0], 1: VOTES[1], 3: VOTES[2], 4: VOTES[3], 5: VOTES[4]}
  for split, rows in expected_rows.items():
    got = records(builder, split)
    assert [r["source"] for r in got] == [names[i].encode() for i in rows]
    for r, i in zip(got, rows):
      vote_list, source_label, expression = vote_case[i]
      np.testing.assert_array_equal(r["votes"], vote_list)
      np.testing.assert_array_equal(decode(r["image"]), pixels[i])
      assert (r["source_label"], r["expression"], r["has_label"]) == (source_label, expression, expression != -1)


def test_ferplus_misaligned_files(tmp_path):
  root = tmp_path / "manual"
  write_fer2013(root / "fer2013.csv", [0, 0], ["Training", "PublicTest"], fer_rows(2))
  header = "Usage,Image name," + ",".join(labels.FERPLUS_VOTE_COLUMNS)
  write(root / "fer2013new.csv", f"{header}\nTraining,a.png,{','.join(['1'] * 10)}\n"
        f"PrivateTest,b.png,{','.join(['1'] * 10)}\n")
  with pytest.raises(BadDataError, match=r"fer2013new.csv:3: Usage 'PrivateTest' differs from .*fer2013.csv:3"):
    builders.build("ferplus", root, tmp_path / "strict")
  write(root / "fer2013new.csv", f"{header}\nTraining,a.png,{','.join(['1'] * 10)}\n")
  with pytest.raises(LayoutError, match="different numbers of rows"):
    builders.build("ferplus", root, tmp_path / "short")


@pytest.mark.parametrize("name", ["affectnet", "rafdb", "fer2013", "ferplus"])
def test_face_builders_missing_files_show_layout(tmp_path, name):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "unrelated.txt").write_text("x")
  with pytest.raises(LayoutError, match="Expected layout"):
    builders.build(name, tmp_path / "manual", tmp_path / "tfds")
  with pytest.raises(LayoutError, match=f"{tmp_path / 'nowhere'}"):
    builders.build(name, tmp_path / "nowhere", tmp_path / "tfds2")


# ---------------------------------------------------------------------------------------------
# Integration: every builder on the synthetic generator's output (3 videos x ~40 frames).

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  from affect_jax.data import synthetic as synthetic_lib  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("synthetic")
  summary = synthetic_lib.generate(str(out), num_videos=3, frames_per_video=40, num_test_videos=1,
                                   affectnet_images=10, rafdb_images=10, fer2013_images=10)
  return out, {name: out / path for name, path in summary["roots"].items()}, summary


def count_annotations(root):
  """(split, video) -> {task: (lines, valid lines)} by plain text counting, plus image numbers."""
  counted = {}
  for task, folder in TASK_DIRS.items():
    for split, split_dir in SPLIT_DIRS.items():
      directory = os.path.join(root, "6th_ABAW_Annotations", folder, split_dir)
      for name in os.listdir(directory):
        with open(os.path.join(directory, name), newline="") as f:
          lines = [line for line in f.read().splitlines() if line.strip()]
        if any(c.isalpha() for c in lines[0]):
          lines = lines[1:]
        marker = "-5" if task == "va" else "-1"
        valid = sum(marker not in line.split(",") for line in lines)
        counted.setdefault((split, name[:-4]), {})[task] = (len(lines), valid)
  return counted


def image_numbers(root, video):
  for folder in ("cropped_aligned", "cropped_aligned_new_50_vids"):
    if os.path.isdir(os.path.join(root, folder, video)):
      return sorted(int(n[:-4]) for n in os.listdir(os.path.join(root, folder, video)))
  raise AssertionError(video)


def test_synthetic_affwild2_counts_match_the_files(synthetic, tmp_path):
  _, roots, summary = synthetic
  root = roots["aff_wild2"]
  counted = count_annotations(root)
  built = {config: builders.build("affwild2", root, tmp_path, config) for config in ("frames", "videos")}
  by_video = {v["video_id"]: v for v in summary["videos"]}
  test_videos = sorted(v["video_id"] for v in summary["videos"] if v["test_sets"])
  assert set(built["frames"].info.splits) == {"train", "validation", "test"}
  for split in ("train", "validation", "test"):
    videos = records(built["videos"], split)
    frames = records(built["frames"], split)
    expected_ids = (test_videos if split == "test"
                    else sorted(v for (s, v) in counted if s == split))
    assert [r["video_id"].decode() for r in videos] == expected_ids
    assert len(frames) == sum(r["num_frames"] for r in videos)
    for record in videos:
      video = record["video_id"].decode()
      tasks = counted.get((split, video), {})
      images = image_numbers(root, video)
      assert record["num_frames"] == max([n for n, _ in tasks.values()] + images)
      assert record["num_frames"] == by_video[video]["num_frames"]
      plan = by_video[video]  # num_images: the last frame that may have an image
      assert record["has_face"].sum() == len(images) == plan["num_images"] - len(plan["missing_frames"])
      assert not record["has_face"][np.asarray(plan["missing_frames"]) - 1].any()
      video_frames = [r for r in frames if r["video_id"].decode() == video]
      assert [r["has_face"] for r in video_frames] == record["has_face"].tolist()
      for task in schema.TASKS:
        assert record[f"{task}_valid"].sum() == tasks.get(task, (0, 0))[1], (split, video, task)
        assert record[f"labels_{task}"] == (task in by_video[video]["test_sets"] if split == "test"
                                            else task in tasks)


def csv_data_rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))[1:]


def test_synthetic_face_datasets_counts_match_the_files(synthetic, tmp_path):
  _, roots, _ = synthetic
  affectnet = builders.build("affectnet", roots["affectnet"], tmp_path)
  for split, name in (("train", "training.csv"), ("validation", "validation.csv")):
    rows = csv_data_rows(roots["affectnet"] / name)
    got = records(affectnet, split)
    assert [r["source_label"] for r in got] == [int(row[6]) for row in rows]
    assert [r["has_label"] for r in got] == [int(row[6]) < 8 for row in rows]
  rafdb = builders.build("rafdb", roots["raf_db"], tmp_path)
  lines = (roots["raf_db"] / "EmoLabel" / "list_patition_label.txt").read_text().split()[::2]
  for split in ("train", "test"):
    assert len(rafdb.as_data_source(split)) == sum(n.startswith(f"{split}_") for n in lines)
  fer_rows_ = csv_data_rows(roots["fer2013"] / "fer2013.csv")
  ferplus_rows = csv_data_rows(roots["ferplus"] / "fer2013new.csv")
  fer2013 = builders.build("fer2013", roots["fer2013"], tmp_path)
  ferplus = builders.build("ferplus", roots["ferplus"], tmp_path)
  for split, usage in (("train", "Training"), ("validation", "PublicTest"), ("test", "PrivateTest")):
    assert len(fer2013.as_data_source(split)) == sum(row[2] == usage for row in fer_rows_)
    assert len(ferplus.as_data_source(split)) == sum(row[0] == usage and bool(row[1]) for row in ferplus_rows)
