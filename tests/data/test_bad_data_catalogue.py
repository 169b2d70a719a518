"""The bad-data catalogue of issue 9: each case's exact error, or its counted skip.

Cases already proven elsewhere (through `builders.build`, what every stage calls):

  truncated JPEG, zero-byte JPEG, PNG data in a .jpg   test_builders.py::test_affwild2_bad_face_image
  annotation line: wrong field count, non-numeric      test_builders.py::test_affwild2_bad_annotation_line
  out-of-range value                                   test_builders.py::test_affwild2_bad_annotation_line
                                                       (VA), ::test_affwild2_class_value_out_of_range
                                                       (EXPR, AU)
  empty annotation file                                test_builders.py::test_affwild2_empty_annotation_file
  NaN / inf in stored features (writer, reader)        test_feature_store.py::test_non_finite_features_*
  missing manual folder (builder)                      test_builders.py::test_affwild2_missing_manual_dir

This file adds the rest, through the user-facing path (the builders, `stages.run`, or the
`affect_jax.main` command line).
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from affect_jax import stages
from affect_jax.data import builders
from affect_jax.data import feature_store
from affect_jax.data import features as features_lib
from affect_jax.data.builders.bad_data import BadDataError, LayoutError
from conftest import FEATURE_DIM, REPO, feature_record, run_stage, write_tiny_store
from configs import va as va_config
from test_builders import records, small_copy


# ---------------------------------------------------------------------------------------------
# A video folder with no frames.


def test_test_video_folder_with_no_frames_is_reported(tmp_path):
  copy = small_copy(tmp_path / "manual")
  copy.add_images("9-30-1280x720", [1, 2])
  folder = os.path.join(copy.root, "cropped_aligned", "8-30-1280x720")
  os.makedirs(folder)
  copy.add_test_list("va", ["9-30-1280x720", "8-30-1280x720"])
  with pytest.raises(BadDataError, match=f"{folder}: test video folder has no face images"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  summary = builder.info.metadata["bad_data"]
  assert summary["num_skipped"] == 1 and summary["skipped"][0].startswith(
      f"{folder}: test video folder has no face images")
  assert [r["video_id"] for r in records(builder, "test")] == [b"9-30-1280x720"]


def test_annotated_video_folder_with_no_frames_is_reported(tmp_path):
  copy = small_copy(tmp_path / "manual")
  copy.add_images("3-30-1280x720", [1, 2])
  copy.add_labels("va", "train", "3-30-1280x720", [(0.5, 0.5), (0.25, 0.0)])
  folder = os.path.join(copy.root, "cropped_aligned", "1-30-1280x720")
  shutil.rmtree(folder)
  os.makedirs(folder)
  with pytest.raises(BadDataError, match=f"{folder}: video folder has no face images"):
    builders.build("affwild2", copy.root, tmp_path / "strict", "videos")
  builder = builders.build("affwild2", copy.root, tmp_path / "lenient", "videos", bad_data="skip")
  summary = builder.info.metadata["bad_data"]
  assert summary["num_skipped"] == 1 and summary["skipped"][0].startswith(
      f"{folder}: video folder has no face images")
  assert [r["video_id"] for r in records(builder, "train")] == [b"3-30-1280x720"]


# ---------------------------------------------------------------------------------------------
# NaN in stored features, met by the temporal stage.


def smoke_config(arg="size=smoke"):
  return va_config.get_config(arg)


def test_nan_in_stored_features_stops_the_temporal_stage_naming_video_and_frame(tmp_path):
  # A store written by another tool (or corrupted) that skipped write_feature_store's check.
  good = feature_record("1-30-640x360", 40, 0)
  bad = feature_record("2-30-640x360", 40, 1)
  bad["features"][16, 3] = np.nan
  out_dir = stages.stage_dir(str(tmp_path), "extract")
  builder = feature_store._FeatureStoreBuilder(  # pylint: disable=protected-access
      name=feature_store.NAME, version=feature_store.VERSION,
      features=features_lib.feature_store_features(FEATURE_DIM),
      split_datasets={"train": iter(enumerate([good, bad])),
                      "validation": iter(enumerate([feature_record("3-30-640x360", 40, 2)]))},
      data_dir=out_dir, disable_shuffling=True)
  builder.download_and_prepare(file_format="array_record")
  with pytest.raises(ValueError, match=(
      r"feature store .*affwild2_features/1.0.0 split 'train' record 1, video 2-30-640x360: "
      r"1 non-finite \(NaN/inf\) feature values, first at frame 17")):
    stages.run(smoke_config(), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "va", "checkpoints"))


# ---------------------------------------------------------------------------------------------
# A video shorter than one window: padded, trained on, and every one of its frames scored once.


@pytest.mark.slow
def test_video_shorter_than_one_window_is_padded_and_every_frame_scored(tmp_path, jax_cache_dir):
  records_by_split = write_tiny_store(tmp_path / "W")  # validation has a 25-frame video; window 30
  short = records_by_split["validation"][1]
  assert short["num_frames"] < smoke_config().window
  result = run_stage(jax_cache_dir, "configs/va.py:size=smoke", str(tmp_path / "W"),
                     "--config.num_train_steps=2")
  assert result.returncode == 0, result.stdout[-3000:]
  with open(tmp_path / "W" / "va" / "predictions" / "validation.txt") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["image_location", "valence", "arousal"]
  for record in records_by_split["validation"]:
    frames = [r[0] for r in rows[1:] if r[0].startswith(record["video_id"] + "/")]
    assert frames == [f"{record['video_id']}/{k:05d}.jpg" for k in range(1, record["num_frames"] + 1)]
  with open(tmp_path / "W" / "va" / "scores.json") as f:
    scores = json.load(f)["latest"]
  expected_scored = sum(int(r["va_valid"].sum()) for r in records_by_split["validation"])
  assert scores["num_frames"] == expected_scored == 45 - 7 + 25 - 4


# ---------------------------------------------------------------------------------------------
# A missing manual folder, and an unwritable workdir.


def test_missing_manual_folder_is_refused_before_any_work(tmp_path):
  missing = tmp_path / "no_such_affwild2"
  with pytest.raises(FileNotFoundError, match=f"config.data.affwild2_dir={missing} is not a folder"):
    stages.run(smoke_config(f"size=smoke,affwild2={missing}"), str(tmp_path / "W"))
  assert not os.path.exists(tmp_path / "W" / "data")
  empty = tmp_path / "empty_affwild2"
  empty.mkdir()
  with pytest.raises(LayoutError, match=(f"(?s)affwild2: Manual directory {empty} does not exist or is "
                                         r"empty.*cropped_aligned/<video>/00001\.jpg")):
    stages.run(smoke_config(f"size=smoke,affwild2={empty}"), str(tmp_path / "W"))


def _main(workdir):
  return subprocess.run(
      [sys.executable, "-m", "affect_jax.main", "--config=configs/va.py:size=smoke",
       f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_unwritable_workdir_is_refused_at_start(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  workdir = blocker / "W"
  result = _main(workdir)
  assert result.returncode == 1
  assert f"Workdir {workdir} is not writable: [Errno 20] Not a directory" in result.stdout
  assert "Running stage" not in result.stdout and "Generating" not in result.stdout
  if os.geteuid() != 0:  # root writes through permission bits
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    result = _main(locked / "W")
    assert result.returncode == 1 and "is not writable: [Errno 13] Permission denied" in result.stdout
    assert not os.path.exists(locked / "W")
