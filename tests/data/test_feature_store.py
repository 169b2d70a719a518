"""Feature store: TFDS array_record round trip, Grain random access, non-finite features refused."""

import pickle

import grain
import numpy as np
import pytest

from affect_jax.data import feature_store, features, schema

DIM = 5


def video_record(video_id, num_frames, seed):
  rng = np.random.default_rng(seed)
  return {
      "video_id": video_id,
      "num_frames": num_frames,
      "has_face": rng.random(num_frames) < 0.8,
      "va": rng.uniform(-1, 1, (num_frames, 2)).astype(np.float32),
      "va_valid": rng.random(num_frames) < 0.9,
      "expr": rng.integers(-1, 8, num_frames).astype(np.int32),
      "expr_valid": rng.random(num_frames) < 0.9,
      "au": rng.integers(0, 2, (num_frames, 12)).astype(np.int32),
      "au_valid": rng.random(num_frames) < 0.9,
      "labels_va": True, "labels_expr": bool(seed % 2), "labels_au": False,
      "features": rng.normal(size=(num_frames, DIM)).astype(np.float32),
  }


SPLITS = {
    "train": [video_record("1-30-1280x720", 7, 0), video_record("10-60-1280x720_left", 3, 1),
              video_record("2-30-640x360", 11, 2)],
    "validation": [video_record("5-60-1920x1080-1", 4, 3)],
}


def assert_same(actual, expected):
  assert set(actual) == set(schema.FEATURE_KEYS)
  assert actual["video_id"] == expected["video_id"].encode()
  for key in schema.FEATURE_KEYS[1:]:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
  assert actual["features"].dtype == np.float32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("store")
  # Generators: the writer must consume records lazily, once.
  path = feature_store.write_feature_store(
      out_dir, {split: (r for r in recs) for split, recs in SPLITS.items()}, DIM)
  return out_dir, path


def test_round_trip_every_record_in_order(store):
  out_dir, path = store
  assert path == feature_store.store_path(out_dir) and (path / "dataset_info.json").exists()
  assert any(p.name.startswith(f"{feature_store.NAME}-train.array_record") for p in path.iterdir())
  assert feature_store.feature_dim(out_dir) == DIM
  for split, expected in SPLITS.items():
    source = feature_store.open_feature_store(out_dir, split)
    assert len(source) == len(expected)
    for actual, wanted in zip(source, expected):
      assert_same(actual, wanted)
    batch = source.__getitems__([2, 0] if split == "train" else [0])
    assert [r["video_id"] for r in batch] == [expected[i]["video_id"].encode()
                                             for i in ([2, 0] if split == "train" else [0])]


def test_grain_random_access_and_pickling(store):
  out_dir, _ = store
  source = feature_store.open_feature_store(out_dir, "train")
  dataset = grain.MapDataset.source(source).shuffle(seed=3)
  order = [dataset[i]["video_id"] for i in range(len(dataset))]
  assert sorted(order) == sorted(r["video_id"].encode() for r in SPLITS["train"])
  clone = pickle.loads(pickle.dumps(source))  # Grain worker processes receive a pickled source
  assert_same(clone[1], SPLITS["train"][1])


def test_non_finite_features_refused_at_write_naming_video(tmp_path):
  for bad in (np.nan, np.inf):
    record = video_record("3-25-1920x1080", 6, 4)
    record["features"][4, 2] = bad
    with pytest.raises(ValueError, match=r"video 3-25-1920x1080: 1 non-finite .* first at frame 5"):
      feature_store.write_feature_store(tmp_path, {"train": [SPLITS["train"][0], record]}, DIM)
    assert not feature_store.store_path(tmp_path).exists()


def test_non_finite_features_refused_at_read_naming_video(tmp_path):
  # A store whose writer skipped the check (another tool, or a corrupted copy).
  bad = video_record("4-30-1280x720", 5, 5)
  bad["features"][1:3] = np.nan
  builder = feature_store._FeatureStoreBuilder(
      name=feature_store.NAME, version=feature_store.VERSION,
      features=features.feature_store_features(DIM),
      split_datasets={"train": iter(enumerate([SPLITS["train"][0], bad]))},
      data_dir=str(tmp_path), disable_shuffling=True)
  builder.download_and_prepare(file_format="array_record")
  source = feature_store.open_feature_store(tmp_path, "train")
  assert_same(source[0], SPLITS["train"][0])
  message = r"split 'train' record 1, video 4-30-1280x720: 10 non-finite .* first at frame 2"
  with pytest.raises(ValueError, match=message):
    source[1]
  with pytest.raises(ValueError, match=message):
    source.__getitems__([0, 1])


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(features=r["features"][:, :3]), r"features shape \(6, 3\), expected \(6, 5\)"),
    (lambda r: r.update(num_frames=7), "has 6 frames, num_frames is 7"),
    (lambda r: r.pop("au_valid"), r"missing \['au_valid'\]"),
    (lambda r: r.update(extra=1), r"unexpected \['extra'\]"),
])
def test_malformed_records_refused_naming_video(tmp_path, change, message):
  record = video_record("6-30-1280x720", 6, 6)
  change(record)
  with pytest.raises(ValueError, match=f"split 'validation', video 6-30-1280x720: .*{message}"):
    feature_store.write_feature_store(tmp_path, {"validation": [record]}, DIM)


def test_existing_store_needs_overwrite_and_bad_opens(tmp_path):
  feature_store.write_feature_store(tmp_path, {"train": SPLITS["validation"]}, DIM)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    feature_store.write_feature_store(tmp_path, {"train": SPLITS["train"]}, DIM)
  feature_store.write_feature_store(tmp_path, {"train": SPLITS["train"]}, DIM, overwrite=True)
  assert len(feature_store.open_feature_store(tmp_path, "train")) == 3
  with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train'\]"):
    feature_store.open_feature_store(tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="no feature store"):
    feature_store.open_feature_store(tmp_path / "elsewhere", "train")
  with pytest.raises(ValueError, match="split 'train' has no records"):
    feature_store.write_feature_store(tmp_path / "empty", {"train": []}, DIM)
