"""The one rule for frames without a face image, used in training, validation, test and predict.

A frame with no face takes the features of the nearest frame that has one (the earlier frame on a
tie). A video with no face at all keeps zero features. Labels are untouched: a face-less frame
with a valid label is trained on and scored like any other, as the challenge scores every frame.
"""

import numpy as np


def nearest_face_index(has_face):
  """For each frame, the index of the nearest frame with a face (-1 if the video has none)."""
  has_face = np.asarray(has_face, bool)
  n = has_face.size
  idx = np.arange(n)
  if not has_face.any():
    return np.full(n, -1, np.int64)
  face_idx = np.flatnonzero(has_face)
  pos = np.searchsorted(face_idx, idx)  # first face frame at or after each frame
  after = face_idx[np.minimum(pos, face_idx.size - 1)]
  before = face_idx[np.maximum(pos - 1, 0)]
  use_before = (np.abs(idx - before) <= np.abs(after - idx)) & (before <= idx) | (after < idx)
  return np.where(has_face, idx, np.where(use_before, before, after))


def fill_missing_faces(features, has_face):
  """features [T, D] with face-less frames replaced by their nearest face frame's features."""
  features = np.asarray(features)
  source = nearest_face_index(has_face)
  if (source < 0).all():
    return np.zeros_like(features)
  return features[source]
