"""Aff-Wild2 (ABAW) as TFDS: configs ``frames`` (one record per frame) and ``videos`` (per video).

Build:
    tfds build affect_jax/data/builders/affwild2 --manual_dir=<copy> --data_dir=<out> [--config=videos]
  or ``affect_jax.data.builders.build("affwild2", manual_dir, data_dir, "frames")``.
Skipping bad input instead of failing: ``build(..., bad_data="skip")`` or on the command line
``--config='{"name": "frames_skip_bad", "view": "frames", "bad_data": "skip"}'``.
Read: ``tfds.data_source("affwild2/frames", split="train", data_dir=<out>)``.

Splits: ``train`` (Train_Set folders), ``validation`` (Validation_Set folders) and ``test`` (videos
in names_of_videos_in_each_test_set/, images only, all labels invalid; absent without the lists).

Record order (relied on by feature extraction): ``frames`` records are sorted by (video_id, frame)
with video ids in Python string order and frames 1..num_frames; ``videos`` records by video_id.
Record i is therefore the same on every build of the same files.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from affect_jax.data import features
from affect_jax.data.builders import base
from affect_jax.data.builders.affwild2 import layout as layout_lib
from affect_jax.data.builders.affwild2 import videos

VIEWS = ("frames", "videos")


@dataclasses.dataclass(eq=False)
class AffWild2Config(tfds.core.BuilderConfig):
  """``view``: "frames" or "videos"; ``bad_data``: "error" or "skip"; ``verify_decode``: Pillow-decode faces."""

  view: str = "frames"
  bad_data: str = "error"
  verify_decode: bool = False


class Builder(base.ManualDirBuilder):
  """Aff-Wild2 frames or videos with VA, EXPR and AU labels and validity masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = layout_lib.EXPECTED_LAYOUT
  BUILDER_CONFIGS = [
      AffWild2Config(name="frames", view="frames",
                     description="One record per frame: original face JPEG bytes and labels."),
      AffWild2Config(name="videos", view="videos",
                     description="One record per video: per-frame labels and has_face, no pixels."),
  ]

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    if self.builder_config.view not in VIEWS:
      raise ValueError(f"affwild2 config view must be one of {VIEWS}, got {self.builder_config.view!r}")

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.view == "frames":
      feature_dict = features.affwild2_frame_features()
    else:
      feature_dict = features.affwild2_video_features()
    return self.dataset_info(
        feature_dict,
        description=__doc__,
        homepage="https://ibug.doc.ic.ac.uk/resources/aff-wild2/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    found = layout_lib.find_layout(self.manual_root(dl_manager), self.bad_data)
    plans = {split: videos.plan_labelled_split(found, split, self.bad_data)
             for split in layout_lib.SPLIT_FOLDERS}
    if found.test_lists:
      plans["test"] = videos.plan_test_split(found, self.bad_data)
    self.info.metadata["annotation_root"] = found.annotation_root.name
    self.info.metadata["task_folders"] = {task: path.name for task, path in found.task_dirs.items()}
    return {split: self._generate_examples(split_plans) for split, split_plans in plans.items()}

  def _generate_examples(self, plans: list[videos.VideoPlan]):
    """Yields (running index, record) in (video_id, frame) order; see the module docstring."""
    if self.builder_config.view == "videos":
      for index, plan in enumerate(plans):
        yield index, videos.video_record(plan, self.bad_data, self.verify_decode)
      return
    index = 0
    for plan in plans:
      for record in videos.frame_records(plan, self.bad_data, self.verify_decode):
        yield index, record
        index += 1
