"""The per-frame feature store written by the ``extract`` stage and read by temporal training.

A TFDS dataset (array_record files, written with TFDS's ad-hoc builder, the machinery behind
``tfds.dataset_builders.store_as_tfds_dataset``) at ``<out_dir>/affwild2_features/1.0.0/``: one
record per video, the ``videos`` fields (schema.VIDEO_KEYS) plus ``features`` float32
``[num_frames, feature_dim]``. Records keep the order in which they were given. Non-finite
features are refused when writing and when reading, naming the video.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from affect_jax.data import features as features_lib
from affect_jax.data import schema
from affect_jax.data.builders.base import DEFAULT_FILE_FORMAT, source_file_path

NAME = "affwild2_features"
VERSION = "1.0.0"
_PER_FRAME_KEYS = ("has_face", "va", "va_valid", "expr", "expr_valid", "au", "au_valid", "features")


class _FeatureStoreBuilder(adhoc_builder.AdhocBuilder, skip_registration=True):
  """Ad-hoc TFDS builder; only overrides ``code_path`` (see builders.base.source_file_path)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
    return source_file_path(cls)


def store_path(out_dir: os.PathLike | str) -> epath.Path:
  """Folder of the feature store dataset under ``out_dir``."""
  return epath.Path(out_dir) / NAME / VERSION


def _video_name(record: Mapping) -> str:
  video_id = record.get("video_id", "?")
  return video_id.decode() if isinstance(video_id, bytes) else str(video_id)


def non_finite_problem(features: np.ndarray) -> str | None:
  """``"N non-finite values, first at frame k"`` (k 1-based), or None when all are finite."""
  finite = np.isfinite(features)
  if finite.all():
    return None
  bad_rows = np.flatnonzero(~finite.all(axis=tuple(range(1, features.ndim))))
  return f"{int((~finite).sum())} non-finite (NaN/inf) feature values, first at frame {bad_rows[0] + 1}"


def check_record(record: Mapping, feature_dim: int, split: str) -> dict:
  """``record`` as a dict if it is a valid feature-store record, else ValueError naming the video."""
  where = f"feature store split {split!r}, video {_video_name(record)}"
  if set(record) != set(schema.FEATURE_KEYS):
    missing = sorted(set(schema.FEATURE_KEYS) - set(record))
    extra = sorted(set(record) - set(schema.FEATURE_KEYS))
    raise ValueError(f"{where}: record keys differ from schema.FEATURE_KEYS "
                     f"(missing {missing}, unexpected {extra})")
  features = np.asarray(record["features"])
  num_frames = int(record["num_frames"])
  if features.ndim != 2 or features.shape[1] != feature_dim:
    raise ValueError(f"{where}: features shape {features.shape}, expected ({num_frames}, {feature_dim})")
  for key in _PER_FRAME_KEYS:
    if len(record[key]) != num_frames:
      raise ValueError(f"{where}: {key} has {len(record[key])} frames, num_frames is {num_frames}")
  problem = non_finite_problem(features)
  if problem is not None:
    raise ValueError(f"{where}: {problem}")
  return {**record, "features": features.astype(np.float32, copy=False)}


def _checked_examples(records: Iterable[Mapping], feature_dim: int, split: str):
  count = 0
  for count, record in enumerate(records, 1):
    yield count - 1, check_record(record, feature_dim, split)
  if count == 0:
    raise ValueError(f"feature store split {split!r} has no records")


def write_feature_store(
    out_dir: os.PathLike | str,
    split_to_records: Mapping[str, Iterable[Mapping]],
    feature_dim: int,
    *,
    overwrite: bool = False,
    description: str = "Per-frame features of Aff-Wild2 videos.",
) -> epath.Path:
  """Writes one record per video and split; returns the dataset folder.

  Args:
    out_dir: TFDS data dir; the store goes to ``<out_dir>/affwild2_features/1.0.0``.
    split_to_records: split name -> records (schema.FEATURE_KEYS), consumed once, in order.
    feature_dim: D of ``features`` [T, D].
    overwrite: replace an existing store (otherwise FileExistsError).
    description: stored in the dataset info (e.g. which model and checkpoint made the features).
  """
  if not split_to_records:
    raise ValueError("write_feature_store needs at least one split")
  if store_path(out_dir).exists():
    if not overwrite:
      raise FileExistsError(f"feature store {store_path(out_dir)} exists; pass overwrite=True to replace it")
    store_path(out_dir).rmtree()
  builder = _FeatureStoreBuilder(
      name=NAME,
      version=VERSION,
      features=features_lib.feature_store_features(feature_dim),
      split_datasets={split: _checked_examples(records, feature_dim, split)
                      for split, records in split_to_records.items()},
      data_dir=os.fspath(out_dir),
      description=description,
      disable_shuffling=True,
      file_format=DEFAULT_FILE_FORMAT,
  )
  builder.download_and_prepare()
  return store_path(out_dir)


class FeatureStoreSource(Sequence):
  """Random-access source of one split (Grain ``RandomAccessDataSource``), checking features."""

  def __init__(self, source, path: epath.Path, split: str):
    self._source = source
    self.path = path
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def _checked(self, index: int, record: dict) -> dict:
    problem = non_finite_problem(record["features"])
    if problem is not None:
      raise ValueError(f"feature store {self.path} split {self.split!r} record {index}, "
                       f"video {_video_name(record)}: {problem}")
    return record

  def __getitem__(self, index: int) -> dict:
    return self._checked(index, self._source[index])

  def __iter__(self):
    for index in range(len(self)):
      yield self[index]

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    records = self._source.__getitems__(indices)
    return [self._checked(index, record) for index, record in zip(indices, records)]

  def __repr__(self) -> str:
    return f"FeatureStoreSource({self.path}, split={self.split!r}, len={len(self)})"


def is_complete(out_dir: os.PathLike | str) -> bool:
  """True once a store was fully written (TFDS writes dataset_info.json last)."""
  return (store_path(out_dir) / "dataset_info.json").exists()


def open_feature_store(out_dir: os.PathLike | str, split: str) -> FeatureStoreSource:
  """Random-access source over ``split`` of the store under ``out_dir``."""
  path = store_path(out_dir)
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no feature store at {path} (written by write_feature_store)")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"feature store {path} has no split {split!r}; it has {sorted(builder.info.splits)}")
  return FeatureStoreSource(builder.as_data_source(split), path, split)


def feature_dim(out_dir: os.PathLike | str) -> int:
  """D of the store under ``out_dir``."""
  builder = tfds.builder_from_directory(store_path(out_dir))
  return int(builder.info.features["features"].shape[-1])
