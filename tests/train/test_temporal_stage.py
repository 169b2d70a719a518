"""Issue 5's scoring and logging promises, read back from a real run of the whole method.

`smoke_chain` (tests/conftest.py) is `python -m affect_jax.main --config=configs/va.py:size=smoke
--workdir=W` on the synthetic default: data, MAE pre-training, fine-tuning, features, VA. These
tests read its outputs against the raw annotation files, never against the code that wrote them.
"""

import csv
import glob
import io
import json
import os

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from conftest import NUM_TRAIN_STEPS, copy_workdir, run_stage

pytestmark = pytest.mark.slow


def annotation_dir(workdir, task_folder, split_folder):
  (root,) = glob.glob(os.path.join(workdir, "data", "synthetic", "Aff-Wild2", "*_ABAW_Annotations"))
  return os.path.join(root, task_folder, split_folder)


def _is_number(text):
  try:
    float(text)
  except ValueError:
    return False
  return True


def read_annotations(folder):
  """video -> list of annotation rows (strings), header dropped."""
  videos = {}
  for path in sorted(glob.glob(os.path.join(folder, "*.txt"))):
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip()]
    if lines and not _is_number(lines[0].split(",")[0]):
      lines = lines[1:]  # header (column names)
    videos[os.path.basename(path)[:-4]] = lines
  return videos


def read_submission_rows(path):
  with open(path) as f:
    rows = list(csv.reader(f))
  per_video = {}
  for row in rows[1:]:
    video, image = row[0].split("/")
    per_video.setdefault(video, []).append((int(image[:-4]), [float(x) for x in row[1:]]))
  return rows[0], per_video


def image_frames(workdir, video):
  pattern = os.path.join(workdir, "data", "synthetic", "Aff-Wild2", "cropped_aligned*", video, "*.jpg")
  return sorted(int(os.path.basename(p)[:-4]) for p in glob.glob(pattern))


def population_ccc(x, y):
  mx, my = x.mean(), y.mean()
  return 2 * np.mean((x - mx) * (y - my)) / (x.var() + y.var() + (mx - my) ** 2)


def tensorboard(folder):
  events = event_accumulator.EventAccumulator(folder, size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  return events


def scalar_series(events, tag):
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}


def pictures(events, tag):
  """Decoded images of the newest event of an image summary ([width, height, png, ...])."""
  (*_, last) = events.Tensors(tag)
  encoded = tensor_util.make_ndarray(last.tensor_proto)
  width, height = int(encoded[0]), int(encoded[1])
  images = [np.asarray(Image.open(io.BytesIO(png))) for png in encoded[2:]]
  assert images and all(im.shape[:2] == (height, width) for im in images)
  return images


def test_one_prediction_per_annotated_frame(smoke_chain):
  annotations = read_annotations(
      annotation_dir(smoke_chain, "VA_Estimation_Challenge", "Validation_Set"))
  header, predicted = read_submission_rows(
      os.path.join(smoke_chain, "va", "predictions", "validation.txt"))
  assert header == ["image_location", "valence", "arousal"]
  assert sorted(predicted) == sorted(annotations)  # fold 0: the official validation videos
  for video, lines in annotations.items():
    frames = [frame for frame, _ in predicted[video]]
    num_frames = max([len(lines)] + image_frames(smoke_chain, video))
    assert frames == list(range(1, num_frames + 1)), video  # every frame once, in order
  valid = sum(1 for lines in annotations.values() for line in lines if "-5" not in line.split(","))
  with open(os.path.join(smoke_chain, "va", "scores.json")) as f:
    scores = json.load(f)
  assert scores["latest"]["num_frames"] == valid
  print(f"{len(annotations)} validation videos, "
        f"{sum(len(v) for v in annotations.values())} annotated frames, {valid} valid, all scored once")


def test_test_set_predictions_one_row_per_listed_frame(smoke_chain):
  (listing,) = glob.glob(os.path.join(smoke_chain, "data", "synthetic", "Aff-Wild2",
                                      "names_of_videos_in_each_test_set", "Valence_Arousal*.txt"))
  with open(listing) as f:
    listed = [line.strip() for line in f if line.strip()]
  _, predicted = read_submission_rows(os.path.join(smoke_chain, "va", "predictions", "test.txt"))
  assert sorted(predicted) == sorted(listed)
  for video in listed:
    assert [frame for frame, _ in predicted[video]] == list(range(1, max(image_frames(smoke_chain, video)) + 1))


def test_written_predictions_rescore_to_the_reported_scores(smoke_chain):
  annotations = read_annotations(
      annotation_dir(smoke_chain, "VA_Estimation_Challenge", "Validation_Set"))
  _, predicted = read_submission_rows(
      os.path.join(smoke_chain, "va", "predictions", "validation.txt"))
  truth = np.array([[float(x) for x in line.split(",")] for video in sorted(annotations)
                    for line in annotations[video]])
  pred = np.array([values for video in sorted(annotations)
                   for _, values in predicted[video][:len(annotations[video])]])
  valid = (truth != -5).all(axis=1)
  ccc_v = population_ccc(pred[valid, 0], truth[valid, 0])
  ccc_a = population_ccc(pred[valid, 1], truth[valid, 1])
  with open(os.path.join(smoke_chain, "va", "scores.json")) as f:
    latest = json.load(f)["latest"]
  np.testing.assert_allclose([latest["ccc_valence"], latest["ccc_arousal"], latest["p_va"]],
                             [ccc_v, ccc_a, (ccc_v + ccc_a) / 2], atol=2e-5)


def test_scores_json_and_tensorboard_agree(smoke_chain):
  with open(os.path.join(smoke_chain, "va", "scores.json")) as f:
    scores = json.load(f)
  latest, history = scores["latest"], scores["history"]
  assert latest == history[-1] and latest["step"] == NUM_TRAIN_STEPS
  assert [h["step"] for h in history] == list(range(2, NUM_TRAIN_STEPS + 1, 2))  # every epoch
  assert scores["best"] == max(history, key=lambda h: h["p_va"])
  assert scores["metric"] == "p_va" and scores["task"] == "va" and scores["fold"] == 0
  for h in history:
    assert h["p_va"] == pytest.approx((h["ccc_valence"] + h["ccc_arousal"]) / 2, abs=1e-6)
  events = tensorboard(os.path.join(smoke_chain, "va"))
  val = scalar_series(events, "val/p_va")
  assert sorted(val) == [h["step"] for h in history]
  for h in history:
    assert val[h["step"]] == pytest.approx(h["p_va"], abs=1e-6)


def test_tensorboard_holds_loss_scores_hyperparameters_and_pictures(smoke_chain):
  va = tensorboard(os.path.join(smoke_chain, "va"))
  tags = set(va.Tags()["tensors"])
  loss = scalar_series(va, "train/loss")
  # every log_every_steps (10 at smoke size) and at the last step
  assert sorted(loss) == sorted(set(range(10, NUM_TRAIN_STEPS + 1, 10)) | {NUM_TRAIN_STEPS})
  assert all(np.isfinite(list(loss.values())))
  assert "steps_per_sec" in tags  # progress reports
  assert {"train/learning_rate", "train/grad_norm", "val/ccc_valence", "val/ccc_arousal",
          "val/p_va"} <= tags
  assert "_hparams_/session_start_info" in tags  # hyper-parameters, written once
  timelines = sorted(t for t in tags if t.startswith("va_timeline/"))
  annotations = read_annotations(
      annotation_dir(smoke_chain, "VA_Estimation_Challenge", "Validation_Set"))
  assert timelines == [f"va_timeline/{v}" for v in sorted(annotations)]  # 2 videos (<= 3 asked)
  for tag in timelines:
    (image,) = pictures(va, tag)
    assert image.shape[-1] in (3, 4) and image.std() > 0  # a drawn plot, not a blank
  mae = tensorboard(os.path.join(smoke_chain, "mae_pretrain"))
  assert "train/loss" in mae.Tags()["tensors"]
  reconstructions = pictures(mae, "reconstructions")
  assert len(reconstructions) == 8 and all(im.std() > 0 for im in reconstructions)
  # original | masked | reconstruction side by side: three times as wide as high
  assert reconstructions[0].shape[1] == 3 * reconstructions[0].shape[0]
  finetune = tensorboard(os.path.join(smoke_chain, "mae_finetune"))
  assert {"train/loss", "val/expr_f1"} <= set(finetune.Tags()["tensors"])


def test_expr_stage_writes_confusion_matrix_and_one_row_per_annotated_frame(smoke_chain,
                                                                            jax_cache_dir, tmp_path):
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["data", "features"])
  result = run_stage(jax_cache_dir, "configs/expr.py:size=smoke", workdir, "--config.num_train_steps=2")
  assert result.returncode == 0, result.stdout[-3000:]
  (image,) = pictures(tensorboard(os.path.join(workdir, "expr")), "expr_confusion")
  assert image.std() > 0
  annotations = read_annotations(
      annotation_dir(workdir, "EXPR_Recognition_Challenge", "Validation_Set"))
  header, predicted = read_submission_rows(os.path.join(workdir, "expr", "predictions", "validation.txt"))
  assert header[0] == "image_location" and sorted(predicted) == sorted(annotations)
  for video, lines in annotations.items():
    num_frames = max([len(lines)] + image_frames(workdir, video))
    assert [frame for frame, _ in predicted[video]] == list(range(1, num_frames + 1))
    assert all(len(values) == 1 and 0 <= values[0] <= 7 for _, values in predicted[video])
  valid = sum(1 for lines in annotations.values() for line in lines if line != "-1")
  with open(os.path.join(workdir, "expr", "scores.json")) as f:
    assert json.load(f)["latest"]["num_frames"] == valid


def test_au_stage_scores_every_annotated_frame_and_rescores_with_sklearn(smoke_chain, jax_cache_dir,
                                                                         tmp_path):
  from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["data", "features"])
  result = run_stage(jax_cache_dir, "configs/au.py:size=smoke", workdir, "--config.num_train_steps=2")
  assert result.returncode == 0, result.stdout[-3000:]
  annotations = read_annotations(
      annotation_dir(workdir, "AU_Detection_Challenge", "Validation_Set"))
  header, predicted = read_submission_rows(os.path.join(workdir, "au", "predictions", "validation.txt"))
  assert header[0] == "image_location" and len(header) == 13 and sorted(predicted) == sorted(annotations)
  for video, lines in annotations.items():
    num_frames = max([len(lines)] + image_frames(workdir, video))
    assert [frame for frame, _ in predicted[video]] == list(range(1, num_frames + 1))
    assert all(len(values) == 12 and set(values) <= {0.0, 1.0} for _, values in predicted[video])
  truth = np.array([[int(x) for x in line.split(",")] for video in sorted(annotations)
                    for line in annotations[video]])
  pred = np.array([values for video in sorted(annotations)
                   for _, values in predicted[video][:len(annotations[video])]], int)
  valid = (truth != -1).all(axis=1)
  want = np.mean([f1_score(truth[valid, k], pred[valid, k], zero_division=0.0) for k in range(12)])
  with open(os.path.join(workdir, "au", "scores.json")) as f:
    latest = json.load(f)["latest"]
  assert latest["num_frames"] == valid.sum()
  np.testing.assert_allclose(latest["au_f1"], want, atol=1e-5)
  assert latest["au_f1_tuned"] >= latest["au_f1"] - 1e-6  # 0.5 is among the thresholds tried


def test_extract_names_the_setting_when_the_fine_tuned_encoder_was_made_otherwise(smoke_chain,
                                                                                  jax_cache_dir,
                                                                                  tmp_path):
  # The smoke chain fine-tuned on EXPR alone (8 outputs); an extract run expecting EXPR + VA (10)
  # must say which setting differs, not take the checkpoint for damaged and retrain the stage.
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["data", "mae_finetune"])
  steps_before = sorted(os.listdir(os.path.join(workdir, "mae_finetune", "checkpoints")))
  result = run_stage(jax_cache_dir, "configs/extract.py:size=smoke", workdir,
                     "--config.upstream.finetune_tasks=('expr','va')")
  assert result.returncode != 0
  out = result.stdout
  assert "IncompatibleCheckpointError" in out and "does not fit this config" in out, out[-3000:]
  assert "params/head/kernel: checkpoint" in out and "params/head/bias: checkpoint (8,), config (10,)" in out
  config_json = os.path.join(workdir, "mae_finetune", "config.json")
  assert f"finetune_tasks: ['expr'] in {config_json}, ['expr', 'va'] in this run" in out
  assert "configuration mismatch, not damage" in out and "damaged" not in out
  assert sorted(os.listdir(os.path.join(workdir, "mae_finetune", "checkpoints"))) == steps_before
  assert not os.path.exists(os.path.join(workdir, "features", "affwild2_features"))
