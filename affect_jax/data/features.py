"""TFDS feature dicts for the record layouts in affect_jax.data.schema.

Images are stored as raw encoded bytes (``Tensor(shape=(), dtype=object)``), not
``tfds.features.Image``: the Aff-Wild2 JPEGs and the face datasets' files are kept byte-for-byte
(no re-encode), writing needs no TensorFlow image ops, and readers get ``bytes`` from
``tfds.data_source`` that a Grain transform decodes with Pillow, the same way for every dataset.
Through ``tfds.data_source`` strings come back as ``bytes``, scalars as numpy/Python scalars and
arrays as numpy arrays.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from affect_jax.data import schema

NUM_AUS = len(schema.AU_NAMES)


def encoded_image() -> tfds.features.Tensor:
  """Encoded image file bytes, stored as-is; b"" when there is no image."""
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def _scalar(dtype) -> tfds.features.Scalar:
  return tfds.features.Scalar(dtype=dtype)


def affwild2_frame_features() -> tfds.features.FeaturesDict:
  """One Aff-Wild2 frame (schema.FRAME_KEYS)."""
  features = {
      "video_id": tfds.features.Text(),
      "frame": _scalar(np.int32),
      "has_face": _scalar(np.bool_),
      "image": encoded_image(),
      "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "va_valid": _scalar(np.bool_),
      "expr": _scalar(np.int32),
      "expr_valid": _scalar(np.bool_),
      "au": tfds.features.Tensor(shape=(NUM_AUS,), dtype=np.int32),
      "au_valid": _scalar(np.bool_),
  }
  assert tuple(features) == schema.FRAME_KEYS
  return tfds.features.FeaturesDict(features)


def _video_features() -> dict:
  # Large per-frame arrays are stored as raw bytes: much faster to decode than int/float lists.
  raw = tfds.features.Encoding.BYTES
  features = {
      "video_id": tfds.features.Text(),
      "num_frames": _scalar(np.int32),
      "has_face": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "va": tfds.features.Tensor(shape=(None, 2), dtype=np.float32, encoding=raw),
      "va_valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "expr": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=raw),
      "expr_valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "au": tfds.features.Tensor(shape=(None, NUM_AUS), dtype=np.int32, encoding=raw),
      "au_valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "labels_va": _scalar(np.bool_),
      "labels_expr": _scalar(np.bool_),
      "labels_au": _scalar(np.bool_),
  }
  assert tuple(features) == schema.VIDEO_KEYS
  return features


def affwild2_video_features() -> tfds.features.FeaturesDict:
  """One Aff-Wild2 video, labels only (schema.VIDEO_KEYS)."""
  return tfds.features.FeaturesDict(_video_features())


def feature_store_features(feature_dim: int) -> tfds.features.FeaturesDict:
  """One video of the feature store (schema.FEATURE_KEYS): video fields + float32[T, D]."""
  features = _video_features()
  features["features"] = tfds.features.Tensor(
      shape=(None, feature_dim), dtype=np.float32, encoding=tfds.features.Encoding.BYTES
  )
  assert tuple(features) == schema.FEATURE_KEYS
  return tfds.features.FeaturesDict(features)


def face_image_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """One face image of AffectNet / RAF-DB / FER2013 / FER+ plus dataset-specific ``extra``.

  ``expression`` is the Aff-Wild2 class index (affect_jax.data.labels) or -1;
  ``source_label`` the dataset's own code (-1 when it has none); ``source`` where the record came
  from (relative image path, or ``file:line``).
  """
  return tfds.features.FeaturesDict({
      "image": encoded_image(),
      "expression": _scalar(np.int32),
      "has_label": _scalar(np.bool_),
      "source_label": _scalar(np.int32),
      "source": tfds.features.Text(),
      **extra,
  })


def affectnet_features() -> tfds.features.FeaturesDict:
  """AffectNet adds valence/arousal (``va_valid`` False where the file says -2) and the face box."""
  return face_image_features(
      va=tfds.features.Tensor(shape=(2,), dtype=np.float32),
      va_valid=_scalar(np.bool_),
      face_box=tfds.features.Tensor(shape=(4,), dtype=np.int32),  # x, y, width, height
  )


def ferplus_features(num_vote_columns: int) -> tfds.features.FeaturesDict:
  """FER+ adds the taggers' vote counts in fer2013new.csv column order."""
  return face_image_features(
      votes=tfds.features.Tensor(shape=(num_vote_columns,), dtype=np.int32)
  )
