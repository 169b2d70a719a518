"""Fold 0 = official split; folds 1..4 = a deterministic 4-way split by recording."""

import numpy as np
import pytest

from affect_jax.data import folds

TRAIN = [f"{i}-30-1280x720" for i in range(1, 30)] + ["10-60-1280x720_left",
                                                      "10-60-1280x720_right",
                                                      "122-60-1920x1080-5_left"]
VAL = [f"{i}-25-640x360" for i in range(100, 115)] + ["122-60-1920x1080-5_right",
                                                      "video59_left", "video59_right"]


def test_recording_id_strips_subject_suffix_only():
  assert folds.recording_id("10-60-1280x720_left") == "10-60-1280x720"
  assert folds.recording_id("10-60-1280x720_right") == "10-60-1280x720"
  assert folds.recording_id("122-60-1920x1080-5") == "122-60-1920x1080-5"


def test_fold_zero_is_the_official_split():
  train, val = folds.fold_videos(TRAIN, VAL, fold=0)
  assert train == sorted(TRAIN) and val == sorted(VAL)


def test_folds_partition_train_and_validation():
  everything = set(TRAIN) | set(VAL)
  vals = []
  for fold in range(1, 5):
    train, val = folds.fold_videos(TRAIN, VAL, fold)
    assert not set(train) & set(val)
    assert set(train) | set(val) == everything
    assert len(train) == len(set(train))
    vals.append(set(val))
  # The four validation parts are disjoint and cover every video once.
  assert sum(len(v) for v in vals) == len(everything)
  assert set().union(*vals) == everything
  sizes = sorted(len(v) for v in vals)
  assert sizes[-1] - sizes[0] <= 2  # greedy by count; a left/right pair moves two at once


def test_left_and_right_of_one_recording_share_a_part():
  parts = folds.partition_videos(TRAIN + VAL, 4, seed=3)
  part_of = {v: k for k, part in enumerate(parts) for v in part}
  for pair in [("10-60-1280x720_left", "10-60-1280x720_right"),
               ("122-60-1920x1080-5_left", "122-60-1920x1080-5_right"),
               ("video59_left", "video59_right")]:
    assert part_of[pair[0]] == part_of[pair[1]]


def test_folds_are_deterministic_and_depend_on_seed():
  first = [folds.fold_videos(TRAIN, VAL, k, seed=0) for k in range(1, 5)]
  again = [folds.fold_videos(list(reversed(TRAIN)), VAL, k, seed=0) for k in range(1, 5)]
  assert first == again  # input order does not matter
  other = [folds.fold_videos(TRAIN, VAL, k, seed=1) for k in range(1, 5)]
  assert first != other


def test_weights_balance_frames():
  rng = np.random.default_rng(0)
  ids = [f"v{i}" for i in range(40)]
  frames = {v: int(n) for v, n in zip(ids, rng.integers(100, 10_000, len(ids)))}
  parts = folds.partition_videos(ids, 4, seed=0, weights=frames)
  totals = [sum(frames[v] for v in part) for part in parts]
  assert max(totals) - min(totals) <= max(frames.values())  # greedy LPT-like bound
  with pytest.raises(ValueError, match="weights lack videos"):
    folds.partition_videos(ids, 4, weights={"v0": 1})


def test_bad_fold_numbers_raise():
  with pytest.raises(ValueError, match="fold must be in"):
    folds.fold_videos(TRAIN, VAL, fold=5)
  with pytest.raises(ValueError, match="cannot fill"):
    folds.fold_videos(["a", "b"], ["c"], fold=1)
