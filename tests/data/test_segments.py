"""Windows of w frames every s frames (with a tail window) and their merge back to frames."""

import numpy as np
import pytest

from affect_jax.data import segments


def _video(num_frames, dim=3, video_id="1-30-1280x720", labels_au=True, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "video_id": video_id,
      "num_frames": np.int32(num_frames),
      "features": rng.normal(size=(num_frames, dim)).astype(np.float32),
      "has_face": rng.random(num_frames) > 0.1,
      "va": rng.uniform(-1, 1, (num_frames, 2)).astype(np.float32),
      "va_valid": rng.random(num_frames) > 0.2,
      "expr": rng.integers(0, 8, num_frames).astype(np.int32),
      "expr_valid": np.ones(num_frames, bool),
      "au": rng.integers(0, 2, (num_frames, 12)).astype(np.int32),
      "au_valid": np.ones(num_frames, bool),
      "labels_va": True, "labels_expr": True, "labels_au": labels_au,
  }


@pytest.mark.parametrize("num_frames, expected", [
    (1000, [0, 200, 400, 600, 700]),  # regular starts stop at 600 (frames 600..899): tail at 700
    (900, [0, 200, 400, 600]),        # 600 + 300 = 900 ends exactly on the last frame
    (301, [0, 1]),
    (300, [0]),
    (120, [0]),                       # shorter than a window: one padded window
])
def test_segment_starts_known_answers(num_frames, expected):
  np.testing.assert_array_equal(segments.segment_starts(num_frames, 300, 200), expected)


def test_segment_starts_follow_paper_and_cover_every_frame():
  for num_frames in [1, 5, 299, 300, 301, 499, 500, 501, 2345, 10_000]:
    starts = segments.segment_starts(num_frames, 300, 200)
    regular = starts[:-1] if len(starts) > 1 else starts
    # Paper: segment i covers frames (i-1)*s+1 ... (i-1)*s+w (1-based).
    np.testing.assert_array_equal(regular, 200 * np.arange(len(regular)))
    covered = np.zeros(num_frames, int)
    for start in starts:
      covered[start:start + 300] += 1
      assert start + 300 <= max(num_frames, 300)  # no window sticks out of a long video
    assert covered.min() >= 1


def test_segment_starts_rejects_gaps_and_bad_sizes():
  with pytest.raises(ValueError, match="skip frames"):
    segments.segment_starts(1000, window=100, stride=200)
  with pytest.raises(ValueError, match="num_frames"):
    segments.segment_starts(0)


def test_cut_segments_values_padding_and_masks():
  video = _video(650, labels_au=False)
  cut = segments.cut_segments(video, window=300, stride=200, video_index=7)
  assert [int(s["start"]) for s in cut] == [0, 200, 350]
  for segment in cut:
    start = int(segment["start"])
    assert segment["features"].shape == (300, 3)
    np.testing.assert_array_equal(segment["features"], video["features"][start:start + 300])
    np.testing.assert_array_equal(segment["va_valid"], video["va_valid"][start:start + 300])
    assert segment["frame_mask"].all()
    assert not segment["au_valid"].any()  # the video has no AU annotation file
    assert int(segment["video_index"]) == 7

  short = segments.cut_segments(_video(120), window=300, stride=200)
  assert len(short) == 1
  (segment,) = short
  assert segment["frame_mask"].sum() == 120 and not segment["frame_mask"][120:].any()
  assert not segment["expr_valid"][120:].any() and segment["expr_valid"][:120].all()
  np.testing.assert_array_equal(segment["features"][120:], 0)


def test_cut_segments_offset_shifts_and_clips():
  cut = segments.cut_segments(_video(1000), window=300, stride=200, offset=50)
  assert [int(s["start"]) for s in cut] == [50, 250, 450, 650, 700]


def test_check_video_record_names_video_and_key():
  video = _video(50, video_id="122-60-1920x1080-5_left")
  video["expr"] = video["expr"][:49]
  with pytest.raises(ValueError, match=r"122-60-1920x1080-5_left.*'expr' has 49 rows"):
    segments.check_video_record(video)


def test_frame_owner_is_most_central_window():
  starts = segments.segment_starts(1000, 300, 200)  # centres 149.5 349.5 549.5 749.5 849.5
  owner, position = segments.frame_owner(1000, starts, 300)
  assert owner[249] == 0 and owner[250] == 1      # 99.5 vs 100.5 from the two centres
  assert owner[799] == 3 and owner[800] == 4      # tail window (start 700) takes the end
  assert owner[999] == 4 and position[999] == 299
  # Brute force: nearest centre, earlier window on ties.
  for frame in range(1000):
    distances = [abs(frame - (s + 149.5)) if s <= frame < s + 300 else np.inf for s in starts]
    assert owner[frame] == int(np.argmin(distances))
  np.testing.assert_array_equal(starts[owner] + position, np.arange(1000))


@pytest.mark.parametrize("num_frames", [1, 120, 300, 301, 777, 1000, 2501])
def test_merge_returns_identical_values_exactly_once_per_frame(num_frames):
  rng = np.random.default_rng(num_frames)
  per_frame = rng.normal(size=(num_frames, 4)).astype(np.float32)
  video = _video(num_frames)
  video["features"] = per_frame
  cut = segments.cut_segments(video, 300, 200)
  starts = np.asarray([s["start"] for s in cut])
  preds = np.stack([s["features"] for s in cut])
  masks = np.stack([s["frame_mask"] for s in cut])
  merged = segments.merge_segment_predictions(num_frames, starts, preds, masks)
  np.testing.assert_array_equal(merged, per_frame)  # bit-exact, no averaging
  # Count: marking each window position that supplied a frame uses every frame exactly once.
  owner, position = segments.frame_owner(num_frames, starts, 300)
  used = np.zeros(masks.shape, int)
  np.add.at(used, (owner, position), 1)
  assert used.sum() == num_frames and used.max() == 1
  assert not (used.astype(bool) & ~masks).any()


def test_merge_takes_each_frame_from_its_central_window():
  starts = segments.segment_starts(1000, 300, 200)
  preds = np.broadcast_to(np.arange(len(starts))[:, None, None], (len(starts), 300, 1))
  merged = segments.merge_segment_predictions(1000, starts, preds, np.ones((5, 300), bool))
  expected = np.repeat([0, 1, 2, 3, 4], [250, 200, 200, 150, 200])
  np.testing.assert_array_equal(merged[:, 0], expected)


def test_merge_rejects_uncovered_frames_and_padded_sources():
  with pytest.raises(ValueError, match="lie in no window"):
    segments.merge_segment_predictions(700, [0, 450], np.zeros((2, 200, 1)),
                                       np.ones((2, 200), bool))
  masks = np.ones((1, 300), bool)
  masks[0, 100:] = False
  with pytest.raises(ValueError, match="padded window positions"):
    segments.merge_segment_predictions(150, [0], np.zeros((1, 300, 1)), masks)


def test_merge_batched_segments_groups_by_video_and_ignores_padding():
  videos = [_video(n, seed=n) for n in (650, 120, 300)]
  rows = []
  for index, video in enumerate(videos):
    rows += segments.cut_segments(video, 300, 200, video_index=index)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(rows))  # merging must not rely on the order of segments
  rows = [rows[i] for i in order] + [dict(rows[0], start=np.int64(0))]  # a padding row
  valid = np.array([True] * len(order) + [False])
  merged = segments.merge_batched_segments(
      np.array([r["video_index"] for r in rows]), np.array([r["start"] for r in rows]), valid,
      np.stack([r["features"] for r in rows]), np.stack([r["frame_mask"] for r in rows]),
      {i: int(v["num_frames"]) for i, v in enumerate(videos)})
  for index, video in enumerate(videos):
    np.testing.assert_array_equal(merged[index], video["features"])
  with pytest.raises(ValueError, match="video index 3 has no segment"):
    segments.merge_batched_segments(np.array([0]), np.array([0]), np.array([True]),
                                    np.zeros((1, 300, 1)), np.ones((1, 300), bool), {3: 10})
