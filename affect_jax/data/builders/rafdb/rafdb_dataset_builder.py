"""RAF-DB (basic emotions) aligned faces as TFDS.

Splits from the image name prefix in ``EmoLabel/list_patition_label.txt``: ``train_`` -> train,
``test_`` -> test; records in list-file order. Labels 1..7 (Surprise, Fear, Disgust, Happiness,
Sadness, Anger, Neutral) become Aff-Wild2 classes (affect_jax.data.labels); images are the aligned
100x100 JPEGs, stored as-is.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from affect_jax.data import features, labels
from affect_jax.data.builders import base, face_files

LABEL_FILE = "EmoLabel/list_patition_label.txt"
IMAGE_FOLDER = "Image/aligned"
SPLIT_PREFIXES = {"train": "train_", "test": "test_"}

EXPECTED_LAYOUT = """\
<manual_dir>/
  EmoLabel/list_patition_label.txt      lines like "train_00001.jpg 5" (labels 1..7)
  Image/aligned/train_00001_aligned.jpg ..."""


def aligned_name(image_name: str) -> str:
  """``train_00001.jpg`` -> ``train_00001_aligned.jpg``."""
  stem, dot, suffix = image_name.rpartition(".")
  return f"{stem}_aligned{dot}{suffix}"


def parse_line(line: str) -> tuple[str, str, int]:
  """(split, image name, RAF-DB label) of one list line; ValueError names the problem."""
  fields = line.split()
  if len(fields) != 2:
    raise ValueError(f"expected 2 space-separated fields (image label), found {len(fields)}")
  name, token = fields
  splits = [split for split, prefix in SPLIT_PREFIXES.items() if name.startswith(prefix)]
  if not splits:
    raise ValueError(f"image name {name!r} starts with neither train_ nor test_")
  code = face_files.parse_int(token, "label", range(1, 8))
  return splits[0], name, code


class Builder(base.ManualDirBuilder):
  """RAF-DB aligned face images with expression (Aff-Wild2 classes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(features.face_image_features(), description=__doc__,
                             homepage="http://www.whdeng.cn/raf/model1.html")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual_root(dl_manager)
    label_path = base.require(root / LABEL_FILE, "RAF-DB label list", EXPECTED_LAYOUT)
    image_root = base.require(root / IMAGE_FOLDER, "RAF-DB aligned image folder", EXPECTED_LAYOUT)
    entries = {split: [] for split in SPLIT_PREFIXES}
    lines = label_path.read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        split, name, code = parse_line(line)
      except ValueError as problem:
        self.bad_data.report(label_path, number, str(problem))
        continue
      entries[split].append((number, name, code))
    return {split: self._generate_examples(label_path, image_root, split_entries)
            for split, split_entries in entries.items()}

  def _generate_examples(self, label_path, image_root, entries):
    """Yields (index, record) in list-file order."""
    index = 0
    for number, name, code in entries:
      relative = f"{IMAGE_FOLDER}/{aligned_name(name)}"
      image = face_files.read_image(image_root / aligned_name(name), f"{label_path}:{number}",
                                    self.bad_data, self.verify_decode)
      if image is None:
        continue
      expression = labels.to_affwild2("rafdb", code)
      yield index, {"image": image, "expression": expression, "has_label": True,
                    "source_label": code, "source": relative}
      index += 1
    base.require_records(index, label_path)
