"""Grain pipelines over in-memory records: determinism, state, sharding, coverage, bad data."""

import io
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from affect_jax.data import pipelines
from affect_jax.data import segments

ONE_PROCESS = {"process_index": 0, "process_count": 1}


def encode(array, fmt="JPEG"):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def random_jpeg(seed, size=32):
  return encode(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def face_records(count, offset=0):
  return [{"image": random_jpeg(offset + i)} for i in range(count)]


def frame_records(count, video_id="1-30-1280x720", no_face=(), invalid_expr=(), labels=None):
  records = []
  for i in range(count):
    has_face = i not in no_face
    records.append({
        "video_id": video_id, "frame": np.int32(i + 1), "has_face": np.bool_(has_face),
        "image": random_jpeg(i) if has_face else b"",
        "va": np.array([0.1 * (i % 10), -0.5], np.float32), "va_valid": np.bool_(True),
        "expr": np.int32(labels[i] if labels is not None else i % 8),
        "expr_valid": np.bool_(i not in invalid_expr),
        "au": np.full(12, i % 2, np.int32), "au_valid": np.bool_(True),
    })
  return records


def video_records(lengths, dim=4):
  records = []
  for index, num_frames in enumerate(lengths):
    rng = np.random.default_rng(index)
    records.append({
        "video_id": f"{index}-30-640x360", "num_frames": np.int32(num_frames),
        "features": rng.normal(size=(num_frames, dim)).astype(np.float32),
        "has_face": np.ones(num_frames, bool),
        "va": rng.uniform(-1, 1, (num_frames, 2)).astype(np.float32),
        "va_valid": np.ones(num_frames, bool),
        "expr": rng.integers(0, 8, num_frames).astype(np.int32),
        "expr_valid": np.ones(num_frames, bool),
        "au": rng.integers(0, 2, (num_frames, 12)).astype(np.int32),
        "au_valid": np.ones(num_frames, bool),
        "labels_va": True, "labels_expr": True, "labels_au": index % 2 == 0,
    })
  return records


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def mae(seed, sources=None, **kwargs):
  sources = sources or {"faces": face_records(24)}
  options = dict(weights=None, batch_size=4, image_size=16, seed=seed, read_threads=2)
  options.update(ONE_PROCESS)
  options.update(kwargs)
  return pipelines.mae_images_pipeline(sources, **options)


# ----------------------------------------------------------------------------- images


def test_normalisation_uses_face_statistics():
  mean_pixel = np.round(255 * np.asarray(pipelines.FACE_MEAN)).astype(np.uint8)
  image = np.broadcast_to(mean_pixel, (2, 2, 3))
  normalized = pipelines.normalize_face_image(image)
  expected = (mean_pixel / 255.0 - np.asarray(pipelines.FACE_MEAN)) / np.asarray(pipelines.FACE_STD)
  np.testing.assert_allclose(normalized[0, 0], expected, atol=1e-6)
  white = pipelines.normalize_face_image(np.full((1, 1, 3), 255, np.uint8))[0, 0]
  np.testing.assert_allclose(white, [(1 - 0.471) / 0.220, (1 - 0.363) / 0.193, (1 - 0.333) / 0.180],
                             rtol=1e-6)
  assert normalized.dtype == np.float32


def test_decode_accepts_grey_rgba_png_and_any_size():
  grey = encode(np.arange(48 * 40, dtype=np.uint8).reshape(48, 40) % 251, "PNG")
  rgba = encode(np.full((20, 30, 4), 200, np.uint8), "PNG")
  assert pipelines.decode_rgb(grey, "grey").size == (40, 48)
  assert pipelines.decode_rgb(rgba, "rgba").mode == "RGB"
  sources = {"grey": [{"image": grey}] * 4, "rgba": [{"image": rgba}] * 4}
  batch = next(mae(0, sources))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32


def test_random_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = pipelines.random_resized_crop_box(112, 112, (0.2, 1.0),
                                                                 pipelines.CROP_RATIO, rng)
    width, height = right - left, bottom - top
    assert 0 <= left < right <= 112 and 0 <= top < bottom <= 112
    assert 0.2 * 112 * 112 * 0.95 <= width * height <= 112 * 112
    assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05


def test_mae_same_seed_same_batches_other_seed_different():
  first, second = take(mae(seed=5), 6), take(mae(seed=5), 6)
  assert_batches_equal(first, second)
  other = take(mae(seed=6), 6)
  assert not np.array_equal(first[0]["record_index"], other[0]["record_index"])
  assert not np.allclose(first[0]["image"], other[0]["image"])
  assert first[0]["image"].shape == (4, 16, 16, 3)


def test_mae_epochs_reshuffle_and_reaugment():
  batches = take(mae(seed=1), 12)  # 24 records, batch 4: two epochs
  indices = np.concatenate([b["record_index"] for b in batches])
  assert sorted(indices[:24]) == list(range(24)) and sorted(indices[24:]) == list(range(24))
  assert not np.array_equal(indices[:24], indices[24:])


def test_mixture_weights_are_respected():
  sources = {"big": face_records(30), "small": face_records(5, offset=100)}
  iterator = mae(0, sources, weights={"big": 3.0, "small": 1.0}, batch_size=8)
  counts = np.bincount(np.concatenate([b["source_index"] for b in take(iterator, 50)]),
                       minlength=2)
  assert counts.sum() == 400
  assert abs(counts[1] / 400 - 0.25) < 0.02, counts  # small source repeated to keep its share
  with pytest.raises(ValueError, match="weights name"):
    mae(0, sources, weights={"big": 1.0})


def test_mae_drops_frames_without_face():
  frames = frame_records(12, no_face=(0, 3, 6, 9))
  indices = np.concatenate([b["record_index"] for b in take(mae(0, {"affwild2": frames}), 8)])
  assert not set(indices.tolist()) & {0, 3, 6, 9}
  assert set(indices.tolist()) == {1, 2, 4, 5, 7, 8, 10, 11}


def test_state_restore_continues_with_the_same_batches():
  iterator = mae(seed=3)
  take(iterator, 4)
  state = iterator.get_state()
  expected = take(iterator, 5)
  restored = mae(seed=3)
  restored.set_state(state)
  assert_batches_equal(take(restored, 5), expected)


def test_orbax_composite_checkpoint_restores_the_iterator(tmp_path):
  iterator = pipelines.finetune_frames_pipeline(
      frame_records(20), batch_size=3, image_size=16, seed=0, read_threads=0, **ONE_PROCESS)
  take(iterator, 3)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(7, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.array(7, np.int32)}),
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 4)
  fresh = pipelines.finetune_frames_pipeline(
      frame_records(20), batch_size=3, image_size=16, seed=0, read_threads=0, **ONE_PROCESS)
  restored = manager.restore(7, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"step": np.array(0, np.int32)}),
      data=grain.checkpoint.CheckpointRestore(fresh)))
  assert int(restored["state"]["step"]) == 7
  assert_batches_equal(take(restored["data"], 4), expected)
  manager.close()


def test_two_processes_partition_each_epoch():
  records = {"faces": face_records(22)}
  seen = []
  for process in range(2):
    start, stop, _ = pipelines.process_share(22, process, 2)
    iterator = mae(0, records, batch_size=1, process_index=process, process_count=2)
    seen.append(np.concatenate([b["record_index"] for b in take(iterator, stop - start)]))
  assert len(seen[0]) == len(seen[1]) == 11
  assert sorted(np.concatenate(seen).tolist()) == list(range(22))  # each exactly once


def test_bad_jpeg_error_names_video_and_frame():
  frames = frame_records(8)
  frames[4]["image"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
  iterator = pipelines.eval_frames_pipeline(frames, batch_size=4, image_size=16, **ONE_PROCESS)
  with pytest.raises(pipelines.BadImageError, match=r"video 1-30-1280x720 frame 00005\.jpg"):
    list(iterator)


def test_face_flag_without_image_bytes_is_an_error():
  frames = frame_records(6)
  frames[3]["image"] = b""  # has_face says True
  with pytest.raises(pipelines.BadImageError, match=r"frame 00004\.jpg: empty image bytes"):
    take(mae(0, {"affwild2": frames}, batch_size=6), 1)


def test_bad_face_image_error_names_source_and_record():
  sources = {"rafdb": face_records(6)}
  sources["rafdb"][2] = {"image": np.array(b"garbage", object),  # 0-d object array, like TFDS
                         "source": "Image/aligned/train_00003_aligned.jpg"}
  with pytest.raises(pipelines.BadImageError,
                     match=r"rafdb record 2 \(Image/aligned/train_00003_aligned"):
    take(mae(0, sources, batch_size=6), 1)


def test_skipped_bad_images_are_counted_and_dropped():
  frames = frame_records(16, labels=[0] * 16)
  frames[5]["image"] = b"broken"
  before = pipelines.skipped_image_count()
  iterator = pipelines.finetune_frames_pipeline(frames, batch_size=5, image_size=16, seed=0,
                                                skip_bad_images=True, read_threads=0,
                                                **ONE_PROCESS)
  indices = np.concatenate([b["record_index"] for b in take(iterator, 3)])
  assert 5 not in indices and pipelines.skipped_image_count() - before == 1


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_uses_only_faces_with_valid_expression():
  frames = frame_records(24, no_face=(1, 2), invalid_expr=(3, 4, 5))
  iterator = pipelines.finetune_frames_pipeline(frames, batch_size=6, image_size=16, seed=0,
                                                read_threads=0, **ONE_PROCESS)
  batches = take(iterator, 8)
  indices = np.concatenate([b["record_index"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert set(indices.tolist()) == set(range(24)) - {1, 2, 3, 4, 5}
  np.testing.assert_array_equal(labels, indices % 8)
  assert batches[0]["image"].shape == (6, 16, 16, 3)


def test_class_balanced_sampling_equalises_classes():
  labels = [0] * 150 + [1] * 50 + [5] * 40
  frames = frame_records(len(labels), labels=labels)
  iterator = pipelines.finetune_frames_pipeline(frames, batch_size=9, image_size=8, seed=0,
                                                class_balanced=True, read_threads=0,
                                                **ONE_PROCESS)
  drawn = np.concatenate([b["label"] for b in take(iterator, 10)])
  counts = np.bincount(drawn, minlength=8)
  assert counts[0] == counts[1] == counts[5] == 30 and counts.sum() == 90
  np.testing.assert_array_equal(pipelines.scan_expression_labels(frames, read_threads=2), labels)
  # Unbalanced for contrast: class 0 dominates.
  plain = pipelines.finetune_frames_pipeline(frames, batch_size=9, image_size=8, seed=0,
                                             read_threads=0, **ONE_PROCESS)
  plain_counts = np.bincount(np.concatenate([b["label"] for b in take(plain, 10)]), minlength=8)
  assert plain_counts[0] > 2 * plain_counts[1]


# ----------------------------------------------------------------------------- evaluation


def test_eval_frames_every_frame_once_in_order_with_padded_tail():
  frames = frame_records(10, no_face=(2,))
  batches = list(pipelines.eval_frames_pipeline(frames, batch_size=4, image_size=32,
                                                **ONE_PROCESS))
  assert len(batches) == 3 and all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  valid = np.concatenate([b["valid"] for b in batches])
  indices = np.concatenate([b["record_index"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(indices[valid], np.arange(10))
  np.testing.assert_array_equal(np.concatenate([b["frame"] for b in batches])[valid],
                                np.arange(1, 11))
  assert np.concatenate([b["video_id"] for b in batches])[0] == "1-30-1280x720"
  # No augmentation: the image is the decoded JPEG, normalised.
  reference = pipelines.normalize_face_image(Image.open(io.BytesIO(frames[7]["image"])))
  np.testing.assert_allclose(batches[1]["image"][3], reference, atol=1e-6)
  has_face = np.concatenate([b["has_face"] for b in batches])
  assert not has_face[2] and np.all(batches[0]["image"][2] == 0)
  assert not np.concatenate([b["expr_valid"] for b in batches])[10:].any()


def test_eval_frames_two_processes_same_batch_count_each_frame_once():
  frames = frame_records(11)
  per_process = [list(pipelines.eval_frames_pipeline(frames, batch_size=4, image_size=8,
                                                     process_index=p, process_count=2))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 2  # lock-step across hosts
  indices = np.concatenate([np.concatenate([b["record_index"][b["valid"]] for b in batches])
                            for batches in per_process])
  assert sorted(indices.tolist()) == list(range(11))


# ----------------------------------------------------------------------------- segments


def test_train_segments_follow_window_and_stride():
  videos = video_records([650, 120, 300])
  table = pipelines.segment_table([650, 120, 300], 100, 50)
  iterator = pipelines.train_segments_pipeline(videos, batch_size=1, window=100, stride=50,
                                               seed=0, read_threads=0, **ONE_PROCESS)
  epoch = take(iterator, len(table))
  seen = sorted((int(b["video_index"][0]), int(b["start"][0])) for b in epoch)
  expected = [(v, int(s)) for v, n in enumerate([650, 120, 300])
              for s in segments.segment_starts(n, 100, 50)]
  assert seen == sorted(expected)
  assert (0, 550) in seen and (1, 20) in seen  # tail windows end on the last frame
  for batch in epoch:
    video, start = int(batch["video_index"][0]), int(batch["start"][0])
    assert batch["features"].shape == (1, 100, 4)
    np.testing.assert_array_equal(batch["features"][0],
                                  videos[video]["features"][start:start + 100])
    assert batch["frame_mask"].all()
    assert bool(batch["au_valid"].any()) == (video % 2 == 0)


def test_train_segments_jitter_is_seeded_and_bounded():
  videos = video_records([1000])

  def starts(seed):
    iterator = pipelines.train_segments_pipeline(videos, batch_size=5, window=300, stride=200,
                                                 jitter=40, seed=seed, read_threads=0,
                                                 **ONE_PROCESS)
    return np.stack([np.sort(b["start"]) for b in take(iterator, 4)])  # 4 epochs of 5

  first = starts(0)
  np.testing.assert_array_equal(first, starts(0))
  assert not np.array_equal(first, starts(1))
  regular = np.array([0, 200, 400, 600, 700])
  assert np.all(np.abs(first - regular) <= 40) and np.all((first >= 0) & (first <= 700))
  assert len({tuple(row) for row in first}) > 1  # a new jitter every epoch


def test_train_segments_two_processes_partition_windows():
  lengths = [650, 120, 300, 900]
  videos = video_records(lengths)
  table = pipelines.segment_table(lengths, 300, 200)
  seen = []
  for process in range(2):
    start, stop, _ = pipelines.process_share(len(table), process, 2)
    iterator = pipelines.train_segments_pipeline(videos, batch_size=1, seed=0, read_threads=0,
                                                 process_index=process, process_count=2)
    seen += [(int(b["video_index"][0]), int(b["start"][0])) for b in take(iterator, stop - start)]
  assert sorted(seen) == sorted(map(tuple, table.tolist()))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_segments_merge_back_to_every_frame_once(process_count):
  lengths = [650, 120, 300, 1001]
  videos = video_records(lengths)
  batches = []
  for process in range(process_count):
    batches += list(pipelines.eval_segments_pipeline(videos, batch_size=3, window=300,
                                                     stride=200, process_index=process,
                                                     process_count=process_count))
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert cat["features"].shape[1:] == (300, 4)
  assert (~cat["segment_valid"]).sum() < 3 * process_count
  assert not cat["frame_mask"][~cat["segment_valid"]].any()
  # An identity "model": predictions are the features; merging must give back every frame.
  merged = segments.merge_batched_segments(cat["video_index"], cat["start"], cat["segment_valid"],
                                           cat["features"], cat["frame_mask"],
                                           dict(enumerate(lengths)))
  for index, video in enumerate(videos):
    np.testing.assert_array_equal(merged[index], video["features"])
  assert sum(len(m) for m in merged.values()) == sum(lengths)
  assert set(cat["video_id"][cat["segment_valid"]]) == {v["video_id"] for v in videos}


def test_feature_record_with_wrong_length_names_the_video():
  videos = video_records([400])
  videos[0]["va"] = videos[0]["va"][:399]
  iterator = pipelines.eval_segments_pipeline(videos, batch_size=2, **ONE_PROCESS)
  with pytest.raises(ValueError, match=r"0-30-640x360: 'va' has 399 rows"):
    next(iterator)


# ----------------------------------------------------------------------------- worker processes

_WORKER_SCRIPT = textwrap.dedent("""
    import io
    import numpy as np
    from absl import app
    from PIL import Image
    from affect_jax.data import pipelines

    def jpeg(seed):
      pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(pixels).save(buffer, format="JPEG")
      return buffer.getvalue()

    def main(_):
      frames = [{"video_id": "v", "frame": np.int32(i + 1), "has_face": np.bool_(i != 4),
                 "image": jpeg(i) if i != 4 else b""} for i in range(13)]
      kwargs = dict(batch_size=4, image_size=8, process_index=0, process_count=1)
      inline = list(pipelines.eval_frames_pipeline(frames, num_workers=0, **kwargs))
      workers = pipelines.eval_frames_pipeline(frames, num_workers=2, **kwargs)
      spawned = list(workers)
      workers.close()
      assert len(inline) == len(spawned) == 4
      for a, b in zip(inline, spawned):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key], err_msg=key)
      print("WORKERS_OK")

    if __name__ == "__main__":
      app.run(main)
""")


@pytest.mark.slow
def test_mp_prefetch_workers_keep_eval_order(tmp_path):
  """Two spawned workers (needs absl flags parsed, hence a script) give the in-process batches."""
  script = tmp_path / "run_workers.py"
  script.write_text(_WORKER_SCRIPT)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
  assert "WORKERS_OK" in result.stdout, result.stderr[-3000:]
