"""The extract stage's records: streamed one video at a time, equal to a whole-split reference."""

import numpy as np
import pytest

from conftest import copy_workdir
from affect_jax.data import datasets
from affect_jax.data import missing_faces
from affect_jax.data import pipelines
from affect_jax.data import schema
from affect_jax.train import extract
from affect_jax.train import trainer
from configs import extract as extract_config


def _mean_colour(images, record_index, valid):
  """A stand-in encoder: each frame's feature is its mean colour (3 values)."""
  return np.asarray(images).mean(axis=(1, 2)), record_index, valid


@pytest.fixture(name="setup")
def _setup(smoke_chain, tmp_path):
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["data"])
  config = extract_config.get_config("size=smoke")
  return config, datasets.prepare(config, workdir), trainer.make_mesh(config.mesh)


def test_each_video_is_written_once_its_last_batch_has_run(setup):
  config, paths, mesh = setup
  calls = []

  def features_fn(*args):
    calls.append(1)
    return _mean_colour(*args)

  frames = datasets.open_source(paths, "affwild2/frames", "train")
  videos = list(datasets.open_source(paths, "affwild2/videos", "train"))
  # Reference: every frame's feature collected first, then cut into videos (the old way).
  every = {}
  for batch in pipelines.eval_frames_pipeline(frames, batch_size=config.batch_size,
                                              image_size=config.model.image_size):
    for i in np.flatnonzero(batch["valid"]):
      every[int(batch["record_index"][i])] = np.asarray(batch["image"][i]).mean(axis=(0, 1))
  assert len(every) == len(frames)

  records = extract.extract_split(paths, "train", config, features_fn, mesh)
  first = 0
  for video in videos:
    record = next(records)
    n = int(video["num_frames"])
    # Streamed: the record arrives right after the batch holding the video's last frame.
    assert len(calls) == -(-(first + n) // config.batch_size), video["video_id"]
    want = missing_faces.fill_missing_faces(np.stack([every[first + k] for k in range(n)]),
                                            np.asarray(video["has_face"], bool))
    np.testing.assert_allclose(record["features"], want, rtol=1e-6, atol=1e-6)
    assert record["features"].dtype == np.float32 and record["video_id"] == video["video_id"].decode()
    assert set(record) == set(schema.VIDEO_KEYS) | {"features"}
    np.testing.assert_array_equal(record["va"], video["va"])
    first += n
  with pytest.raises(StopIteration):
    next(records)
  assert first == len(frames) and len(videos) > 2


@pytest.mark.parametrize("change", ["video missing", "video extra"])
def test_views_that_disagree_are_named(setup, monkeypatch, change):
  config, paths, mesh = setup
  real_open = datasets.open_source

  def open_source(paths, name, split):
    source = real_open(paths, name, split)
    if name != "affwild2/videos":
      return source
    videos = list(source)
    return videos[:-1] if change == "video missing" else videos + [videos[0]]

  monkeypatch.setattr(extract.datasets, "open_source", open_source)
  frames = len(real_open(paths, "affwild2/frames", "train"))
  with pytest.raises(ValueError) as error:
    list(extract.extract_split(paths, "train", config, _mean_colour, mesh))
  message = str(error.value)
  assert f"affwild2/frames train has {frames}" in message and "rebuild the dataset" in message
  if change == "video extra":
    assert "needs frame records" in message
