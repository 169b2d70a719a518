"""Tests of the synthetic dataset generator: layout and formats of SPEC §1/§3, determinism, and
the properties of the hidden signal (lag, AU/VA coupling, class balance, visible geometry)."""

import csv
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from affect_jax.data import synthetic
from affect_jax.data import synthetic_faces
from affect_jax.data.schema import AU_NAMES, EXPR_CLASSES

SMALL = dict(num_videos=4, frames_per_video=60, seed=3, num_test_videos=1,
             affectnet_images=40, rafdb_images=30, fer2013_images=30)
VIDEO_ID = re.compile(r"^\d+-(24|25|30|60)-\d+x\d+(-\d+)?(_left|_right)?$")
E = {name: i for i, name in enumerate(EXPR_CLASSES)}
A = {name: i for i, name in enumerate(AU_NAMES)}


def _tree_digest(root):
  digests = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  summary = synthetic.generate(out, **SMALL)
  return out, summary


def _annotation_path(out, task, split, video):
  return os.path.join(out, synthetic.AFFWILD2_DIR, synthetic.ANNOTATION_ROOT, synthetic.TASK_FOLDERS[task],
                      split, video + ".txt")


def _read_body(path):
  with open(path, "rb") as f:
    raw = f.read().decode()
  lines = raw.splitlines()
  return lines[0], lines[1:], raw


def test_summary_names_every_root(generated):
  out, summary = generated
  assert summary["roots"] == {"aff_wild2": "Aff-Wild2", "affectnet": "AffectNet", "raf_db": "RAF-DB",
                              "fer2013": "FER2013", "ferplus": "FERPlus"}
  with open(os.path.join(out, synthetic.TRUTH_DIR, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert len([v for v in summary["videos"] if v["splits"]]) == SMALL["num_videos"]
  assert len([v for v in summary["videos"] if not v["splits"]]) == SMALL["num_test_videos"]


def test_image_folders_hold_1_based_5_digit_112px_jpegs(generated):
  out, summary = generated
  root = os.path.join(out, synthetic.AFFWILD2_DIR)
  assert sorted(os.listdir(root)) == sorted(list(synthetic.IMAGE_FOLDERS) + [synthetic.ANNOTATION_ROOT,
                                                                            synthetic.TEST_LIST_DIR])
  for video in summary["videos"]:
    assert VIDEO_ID.match(video["video_id"]), video["video_id"]
    folder = os.path.join(root, video["folder"], video["video_id"])
    names = sorted(os.listdir(folder))
    assert all(re.fullmatch(r"\d{5}\.jpg", n) for n in names)
    frames = {int(n[:5]) for n in names}
    expected = set(range(1, video["num_images"] + 1)) - set(video["missing_frames"])
    assert frames == expected
    assert 1 in frames and video["num_images"] in frames
    for n in names[:: max(1, len(names) // 5)]:
      with Image.open(os.path.join(folder, n)) as img:
        assert img.format == "JPEG" and img.size == (112, 112) and img.mode == "RGB"
        img.load()
    # The same video never sits in both image folders.
    other = [f for f in synthetic.IMAGE_FOLDERS if f != video["folder"]][0]
    assert not os.path.exists(os.path.join(root, other, video["video_id"]))


def test_annotation_files_have_header_and_one_line_per_frame(generated):
  out, summary = generated
  seen = set()
  for video in summary["videos"]:
    for task, split in video["splits"].items():
      path = _annotation_path(out, task, split, video["video_id"])
      header, body, raw = _read_body(path)
      seen.add(os.path.relpath(path, out))
      assert header == synthetic.TASK_HEADERS[task]
      assert len(body) == video["num_frames"] >= video["num_images"]
      assert raw.count("\r\n") in (0, raw.count("\n"))  # one line-ending style per file
      for line in body:
        fields = line.split(",")
        if task == "va":
          v, a = map(float, fields)
          assert (v, a) == (-5.0, -5.0) or (-1 <= v <= 1 and -1 <= a <= 1)
        elif task == "expr":
          assert int(line) in range(-1, 8)
        else:
          assert len(fields) == 12 and set(fields) <= {"0", "1", "-1"}
  all_files = set()
  for dirpath, _, files in os.walk(os.path.join(out, synthetic.AFFWILD2_DIR, synthetic.ANNOTATION_ROOT)):
    all_files |= {os.path.relpath(os.path.join(dirpath, f), out) for f in files}
  assert all_files == seen  # no label file for test videos or unlisted tasks


def test_line_k_is_frame_k(generated):
  """Body line k holds the rater's label of frame k (checked against the truth sidecar)."""
  out, summary = generated
  checked = 0
  for video in summary["videos"]:
    truth = np.load(os.path.join(out, synthetic.TRUTH_DIR, video["video_id"] + ".npz"))
    if "va" in video["splits"]:
      _, body, _ = _read_body(_annotation_path(out, "va", video["splits"]["va"], video["video_id"]))
      values = np.array([[float(x) for x in line.split(",")] for line in body])
      valid = values[:, 0] != -5
      np.testing.assert_allclose(values[valid], truth["annotated_va"][valid], atol=6e-4)
      checked += int(valid.sum())
    if "expr" in video["splits"]:
      _, body, _ = _read_body(_annotation_path(out, "expr", video["splits"]["expr"], video["video_id"]))
      values = np.array([int(x) for x in body])
      valid = values != -1
      np.testing.assert_array_equal(values[valid], truth["annotated_expr"][valid])
    assert truth["valence"].shape == (video["num_frames"],)
    np.testing.assert_array_equal(np.flatnonzero(~truth["has_image"]) + 1,
                                  sorted(set(video["missing_frames"]) | set(range(video["num_images"] + 1,
                                                                                    video["num_frames"] + 1))))
  assert checked > 100


def test_test_lists_name_unlabelled_videos(generated):
  out, summary = generated
  listed = set()
  for task, fname in synthetic.TEST_LISTS.items():
    with open(os.path.join(out, synthetic.AFFWILD2_DIR, synthetic.TEST_LIST_DIR, fname)) as f:
      names = f.read().split()
    listed |= set(names)
    assert names == [v["video_id"] for v in summary["videos"] if task in v["test_sets"]]
  test_videos = {v["video_id"] for v in summary["videos"] if not v["splits"]}
  assert listed == test_videos and test_videos


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path):
  out, _ = generated
  synthetic.generate(str(tmp_path / "again"), **SMALL)
  first, again = _tree_digest(out), _tree_digest(str(tmp_path / "again"))
  assert first == again
  synthetic.generate(str(tmp_path / "other"), **dict(SMALL, seed=4, affectnet_images=0, rafdb_images=0,
                                                     fer2013_images=0))
  jpegs = lambda digests: {d for path, d in digests.items() if path.endswith(".jpg")}
  assert not jpegs(_tree_digest(str(tmp_path / "other"))) & jpegs(first)


def test_plan_reproduces_real_quirks():
  plans = synthetic.plan_videos(seed=0, num_videos=40, frames_per_video=600, num_test_videos=4)
  labelled = [p for p in plans if p.splits]
  missing = sum(len(p.missing) for p in plans) / sum(p.num_images for p in plans)
  assert 0.01 <= missing <= 0.03
  assert all(p.missing for p in plans)
  assert sum(p.num_frames > p.num_images for p in plans) >= 5          # extra annotation lines
  assert any(p.video_id.endswith("_left") for p in plans)
  assert {p.video_id[:-5] for p in plans if p.video_id.endswith("_left")} == \
         {p.video_id[:-6] for p in plans if p.video_id.endswith("_right")}
  assert any(len(p.splits) < 3 for p in labelled)                      # only some tasks
  assert any(len(set(p.splits.values())) == 2 for p in labelled)       # one task in the other split
  assert any(p.folder == "cropped_aligned_new_50_vids" for p in plans)
  styles = [s for p in plans for s in p.line_style.values()]
  assert {s[0] for s in styles} == {True, False} and {s[1] for s in styles} == {True, False}
  assert all(3 <= p.lag <= 8 for p in plans)
  assert all(p.va_delay == 0 for p in plans)  # off by default
  val = sum(p.splits.get("va") == "Validation_Set" for p in labelled) / sum("va" in p.splits for p in labelled)
  assert 0.2 <= val <= 0.4
  # Subjects of one recording stay in one split.
  by_recording = {}
  for p in labelled:
    by_recording.setdefault(p.recording, set()).add(p.splits.get("va", p.splits.get("au")))
  assert all(len(s) == 1 for s in by_recording.values())


def test_invalid_markers_and_line_endings_occur_in_written_files(tmp_path):
  """With a dozen videos the real files' quirks all show up."""
  summary = synthetic.generate(str(tmp_path), num_videos=12, frames_per_video=30, seed=0, num_test_videos=0,
                               affectnet_images=0, rafdb_images=0, fer2013_images=0)
  raws, invalid = [], {"va": 0, "expr": 0, "au": 0}
  for video in summary["videos"]:
    for task, split in video["splits"].items():
      _, body, raw = _read_body(_annotation_path(str(tmp_path), task, split, video["video_id"]))
      raws.append(raw)
      invalid[task] += sum("-5" in line.split(",") or "-1" in line.split(",") for line in body)
  assert any("\r\n" in r for r in raws) and any("\r\n" not in r for r in raws)
  assert any(not r.endswith("\n") for r in raws) and any(r.endswith("\n") for r in raws)
  assert all(count > 0 for count in invalid.values()), invalid


def test_labels_lag_the_face():
  """The rater's valence matches the truth `lag` frames earlier better than the same frame."""
  rng = np.random.default_rng(0)
  better = []
  for lag in (3, 5, 8):
    affect = synthetic.simulate_affect(rng, 600, 30.0)
    ann = synthetic.annotate(affect, rng, lag, 30.0)
    err = [np.mean((ann.va[12:, 0] - affect.valence[12 - s:600 - s]) ** 2) for s in range(12)]
    better.append(err[lag] < err[0])
    assert abs(int(np.argmin(err)) - lag) <= 2, (lag, np.round(err, 4))
  assert all(better)


def test_va_delay_changes_only_the_delays_of_the_plan():
  plain = synthetic.plan_videos(seed=0, num_videos=40, frames_per_video=600, num_test_videos=4)
  delayed = synthetic.plan_videos(seed=0, num_videos=40, frames_per_video=600, num_test_videos=4,
                                  va_delay_seconds=(1.5, 2.5))
  assert all(round(1.5 * p.fps) <= p.va_delay <= round(2.5 * p.fps) for p in delayed)
  assert len({p.va_delay for p in delayed}) > 10
  strip = lambda p: {k: v for k, v in dataclasses.asdict(p).items() if k != "va_delay"}
  assert [strip(p) for p in plain] == [strip(p) for p in delayed]
  with pytest.raises(ValueError, match="va_delay_seconds"):
    synthetic.plan_videos(seed=0, num_videos=4, frames_per_video=60, num_test_videos=0, va_delay_seconds=(2, 1))


def test_va_raters_react_later_than_expression_raters():
  """VA labels lag the face by lag + va_delay frames; expression labels by lag only."""
  rng = np.random.default_rng(1)
  affect = synthetic.simulate_affect(rng, 900, 30.0)
  ann = synthetic.annotate(affect, rng, 5, 30.0, va_delay=60)
  err = [np.mean((ann.va[100:] - np.stack([affect.valence, affect.arousal], 1)[100 - s:900 - s]) ** 2)
         for s in range(100)]
  assert abs(int(np.argmin(err)) - 65) <= 3, np.round(err, 4)
  assert err[65] < 0.5 * err[5]
  agree = [np.mean(ann.expr[100:] == affect.expr[100 - s:900 - s]) for s in range(100)]
  assert abs(int(np.argmax(agree)) - 5) <= 2, np.round(agree, 3)
  assert agree[5] > agree[65] + 0.1
  # The delay moves only the VA labels: expression and AU labels are those given without it.
  rng = np.random.default_rng(1)
  affect = synthetic.simulate_affect(rng, 900, 30.0)
  same = synthetic.annotate(affect, rng, 5, 30.0)
  np.testing.assert_array_equal(same.expr, ann.expr)
  np.testing.assert_array_equal(same.au, ann.au)
  assert not np.allclose(same.va, ann.va)


def test_lag_visible_in_written_files(generated):
  out, summary = generated
  shifted, same = [], []
  for video in summary["videos"]:
    if "va" not in video["splits"]:
      continue
    truth = np.load(os.path.join(out, synthetic.TRUTH_DIR, video["video_id"] + ".npz"))
    _, body, _ = _read_body(_annotation_path(out, "va", video["splits"]["va"], video["video_id"]))
    values = np.array([[float(x) for x in line.split(",")] for line in body])
    lag = video["lag_frames"] + video["va_delay_frames"]
    k = np.arange(lag, len(body))
    k = k[values[k, 0] != -5]
    shifted.append(np.mean((values[k, 0] - truth["valence"][k - lag]) ** 2))
    same.append(np.mean((values[k, 0] - truth["valence"][k]) ** 2))
  assert np.mean(shifted) < np.mean(same)


def test_aus_follow_valence_and_arousal_with_documented_signs():
  rng = np.random.default_rng(1)
  tracks = [synthetic.simulate_affect(rng, 600, 30.0) for _ in range(20)]
  v = np.concatenate([t.valence for t in tracks])
  a = np.concatenate([t.arousal for t in tracks])
  au = np.concatenate([t.au_intensity for t in tracks])
  corr = lambda x, name: np.corrcoef(x, au[:, A[name]])[0, 1]
  for name in ("AU6", "AU12"):
    assert corr(v, name) > 0.5, name
  for name in ("AU4", "AU15", "AU7"):
    assert corr(v, name) < -0.3, name
  for name in ("AU1", "AU2", "AU25", "AU26"):
    assert corr(a, name) > 0.2, name
  # Valence and arousal span the whole range.
  assert v.min() < -0.9 and v.max() > 0.9 and a.min() < -0.9 and a.max() > 0.9
  labels = np.concatenate([t.au for t in tracks])
  np.testing.assert_array_equal(labels, au > synthetic.AU_THRESHOLD)
  assert np.all((labels.mean(0) > 0.005) & (labels.mean(0) < 0.6))


def test_expression_balance_is_plausible():
  rng = np.random.default_rng(2)
  expr = np.concatenate([synthetic.simulate_affect(rng, 600, 30.0).expr for _ in range(60)])
  share = np.bincount(expr, minlength=8) / expr.size
  assert np.argmax(share) == E["Neutral"] and 0.3 <= share[E["Neutral"]] <= 0.5, share
  assert share[E["Fear"]] < 0.06 and share[E["Disgust"]] < 0.06
  assert np.all(share > 0.003), share


@pytest.mark.parametrize("v,a,flavour,other,expected", [
    (0.0, 0.1, 0.5, 0.0, "Neutral"), (0.9, 0.2, 0.5, 0.0, "Happiness"), (0.1, 0.9, 0.5, 0.0, "Surprise"),
    (-0.8, -0.6, 0.5, 0.0, "Sadness"), (-0.8, 0.7, 0.1, 0.0, "Anger"), (-0.8, 0.7, 0.8, 0.0, "Fear"),
    (-0.8, 0.0, 0.4, 0.0, "Disgust"), (0.9, 0.2, 0.5, 1.0, "Other")])
def test_expression_rule_known_answers(v, a, flavour, other, expected):
  assert synthetic.classify_expression([v], [a], [flavour], [other])[0] == E[expected]


def _one_face(au=(), valence=0.0, arousal=0.0):
  track = np.zeros((1, 12))
  for name, x in dict(au).items():
    track[0, A[name]] = x
  z = np.zeros(1)
  return synthetic_faces.FaceTrack(au=track, valence=z + valence, arousal=z + arousal, blink=z, smirk=z,
                                   gaze=np.zeros((1, 2)), roll=z, yaw=z, shift=np.zeros((1, 2)), scale=z + 1)


def test_expressions_move_the_drawn_face():
  idn = synthetic_faces.sample_identity(np.random.default_rng(5))
  marks = lambda **kw: synthetic_faces.face_landmarks(idn, _one_face(**kw))[0]
  corners_up = lambda m: (m[51, 1] + m[57, 1]) / 2 - (m[48, 1] + m[54, 1]) / 2
  assert corners_up(marks(au={"AU12": 1.0}, valence=0.8)) > corners_up(marks()) + 3
  assert corners_up(marks(au={"AU15": 1.0}, valence=-0.8)) < corners_up(marks()) - 2
  eye_open = lambda m: m[41, 1] + m[40, 1] - m[37, 1] - m[38, 1]
  assert eye_open(marks(arousal=0.9)) > eye_open(marks(arousal=-0.9)) + 4
  brow = lambda m: m[19, 1]
  assert brow(marks(au={"AU1": 1.0, "AU2": 1.0})) < brow(marks()) - 3
  assert brow(marks(au={"AU4": 1.0})) > brow(marks()) + 2
  gap = lambda m: m[66, 1] - m[62, 1]
  assert gap(marks(au={"AU25": 1.0, "AU26": 1.0})) > gap(marks()) + 8
  # ...and the pixels: a smile changes the mouth region more than the forehead.
  scene = synthetic_faces.sample_scene(np.random.default_rng(6))
  pix = lambda **kw: np.asarray(next(synthetic_faces.render_faces(idn, scene, _one_face(**kw))), float)
  diff = np.abs(pix(au={"AU12": 1.0, "AU6": 1.0}, valence=0.9) - pix()).mean(-1)
  assert diff[70:100].mean() > 5 * diff[:30].mean() + 1


def test_affectnet_csv_and_images(generated):
  out, _ = generated
  root = os.path.join(out, "AffectNet")
  codes = []
  for fname in ("training.csv", "validation.csv"):
    with open(os.path.join(root, fname), newline="") as f:
      rows = list(csv.reader(f))
    assert tuple(rows[0]) == synthetic.AFFECTNET_COLUMNS
    for row in rows[1:]:
      assert len(row) == 9
      path, x, y, w, h, marks, code, v, a = row
      with Image.open(os.path.join(root, "Manually_Annotated_Images", path)) as img:
        assert int(x) >= 0 and int(y) >= 0 and int(x) + int(w) <= img.size[0] and int(y) + int(h) <= img.size[1]
      points = np.array([float(t) for t in marks.split(";")]).reshape(68, 2)
      assert np.all(points[:, 0] > int(x) - 5) and np.all(points[:, 0] < int(x) + int(w) + 5)
      code = int(code)
      codes.append(code)
      assert 0 <= code <= 10
      if code == 10:
        assert (float(v), float(a)) == (-2.0, -2.0)
      else:
        assert -1 <= float(v) <= 1 and -1 <= float(a) <= 1
  assert set(range(8)) <= set(codes) and {8, 9, 10} & set(codes)


def test_rafdb_list_and_aligned_images(generated):
  out, _ = generated
  root = os.path.join(out, "RAF-DB")
  with open(os.path.join(root, "EmoLabel", "list_patition_label.txt")) as f:
    lines = f.read().splitlines()
  assert len(lines) == SMALL["rafdb_images"]
  labels = []
  for line in lines:
    m = re.fullmatch(r"((train_\d{5})|(test_\d{4}))\.jpg ([1-7])", line)
    assert m, line
    labels.append(int(m.group(4)))
    with Image.open(os.path.join(root, "Image", "aligned", m.group(1) + "_aligned.jpg")) as img:
      assert img.size == (100, 100)
  assert any(line.startswith("test_") for line in lines) and set(labels) == set(range(1, 8))


def test_fer2013_and_ferplus_rows_match(generated):
  out, _ = generated
  with open(os.path.join(out, "FER2013", "fer2013.csv"), newline="") as f:
    fer = list(csv.reader(f))
  with open(os.path.join(out, "FERPlus", "fer2013new.csv"), newline="") as f:
    plus = list(csv.reader(f))
  assert fer[0] == ["emotion", "pixels", "Usage"]
  assert plus[0] == ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                     "fear", "contempt", "unknown", "NF"]
  assert len(fer) == len(plus) == SMALL["fer2013_images"] + 1
  usages = [row[2] for row in fer[1:]]
  order = {"Training": 0, "PublicTest": 1, "PrivateTest": 2}
  assert [order[u] for u in usages] == sorted(order[u] for u in usages) and set(usages) == set(order)
  for row_fer, row_plus in zip(fer[1:], plus[1:]):
    pixels = np.array([int(t) for t in row_fer[1].split(" ")])
    assert pixels.size == 2304 and pixels.min() >= 0 and pixels.max() <= 255
    assert int(row_fer[0]) in range(7)
    assert row_plus[0] == row_fer[2]
    votes = [int(t) for t in row_plus[2:]]
    assert sum(votes) == 10
    assert (row_plus[1] == "") == (votes[-1] == 10)
  assert any(row[1] == "" for row in plus[1:]) and any(row[1] for row in plus[1:])


def test_bad_arguments_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="num_videos"):
    synthetic.generate(str(tmp_path), num_videos=1, frames_per_video=60)
  with pytest.raises(ValueError, match="frames_per_video"):
    synthetic.generate(str(tmp_path), num_videos=4, frames_per_video=10)
  with pytest.raises(ValueError, match="0 or >= 10"):
    synthetic.generate(str(tmp_path), num_videos=4, frames_per_video=60, affectnet_images=3)


def test_synthetic_data_made_with_other_settings_is_not_reused(tmp_path):
  """The main job generates the synthetic default once; other settings later are an error, not stale data."""
  import ml_collections
  from affect_jax.data import datasets
  config = ml_collections.ConfigDict({"data": {"synthetic": dict(
      videos=2, frames=30, seed=0, face_images=0, va_delay_seconds=(0.0, 0.0))}})
  out, summary = datasets.generate_synthetic(config, str(tmp_path))
  path = os.path.join(out, synthetic.TRUTH_DIR, "summary.json")
  stamp = os.stat(path).st_mtime_ns
  assert summary["settings"]["va_delay_seconds"] == [0.0, 0.0]
  assert datasets.generate_synthetic(config, str(tmp_path))[1] == summary  # same settings: reused
  config.data.synthetic.va_delay_seconds = (1.0, 2.0)
  with pytest.raises(ValueError, match=r"summary\.json.*va_delay_seconds: \[0\.0, 0\.0\] there, \[1\.0, 2\.0\]"):
    datasets.generate_synthetic(config, str(tmp_path))
  config.data.synthetic.va_delay_seconds = (0.0, 0.0)
  config.data.synthetic.videos = 3
  with pytest.raises(ValueError, match="num_videos: 2 there, 3 in config"):
    datasets.generate_synthetic(config, str(tmp_path))
  assert os.stat(path).st_mtime_ns == stamp  # nothing rewritten
