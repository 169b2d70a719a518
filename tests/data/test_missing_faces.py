import numpy as np

from affect_jax.data import missing_faces


def test_nearest_face_index_known_answer():
  has_face = np.array([0, 0, 1, 0, 0, 0, 1, 0, 1, 0], bool)
  # frame 4 is 2 from frame 2 and 2 from frame 6: the earlier wins.
  np.testing.assert_array_equal(
      missing_faces.nearest_face_index(has_face), [2, 2, 2, 2, 2, 6, 6, 6, 8, 8])


def test_fill_missing_faces_copies_features_and_keeps_face_frames():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(7, 3)).astype(np.float32)
  has_face = np.array([1, 0, 0, 1, 1, 0, 0], bool)
  filled = missing_faces.fill_missing_faces(features, has_face)
  np.testing.assert_array_equal(filled[has_face], features[has_face])
  np.testing.assert_array_equal(filled[[1, 2, 5, 6]], features[[0, 3, 4, 4]])


def test_video_without_faces_gets_zeros():
  filled = missing_faces.fill_missing_faces(np.ones((4, 2)), np.zeros(4, bool))
  np.testing.assert_array_equal(filled, np.zeros((4, 2)))
