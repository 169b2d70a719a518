"""FER2013 as TFDS: 48x48 grey faces from ``fer2013.csv``.

Splits from ``Usage``: Training -> train, PublicTest -> validation, PrivateTest -> test; records in
CSV row order. The ``pixels`` strings become 48x48 greyscale PNG bytes (lossless). Labels 0..6
(Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral) become Aff-Wild2 classes.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from affect_jax.data import features, labels
from affect_jax.data.builders import base, face_files

CSV_CANDIDATES = ("fer2013.csv", "fer2013/fer2013.csv", "FER2013/fer2013.csv")
HEADER = ("emotion", "pixels", "Usage")

EXPECTED_LAYOUT = """\
<manual_dir>/
  fer2013.csv        (or fer2013/ or FER2013/fer2013.csv) header emotion,pixels,Usage"""


def split_lines(path, bad_data) -> dict[str, set[int]]:
  """CSV line numbers of each split, from the Usage column (header checked)."""
  lines = {split: set() for split in face_files.FER_USAGE_TO_SPLIT.values()}
  for line, row in face_files.csv_rows(path):
    if line == 1:
      face_files.check_header(path, row, HEADER)
      continue
    try:
      face_files.check_field_count(row, len(HEADER))
      lines[face_files.fer_split(row[2])].add(line)
    except ValueError as problem:
      bad_data.report(path, line, str(problem))
  return lines


def parse_row(row: list[str]) -> dict:
  """Record of one FER2013 row; ValueError names the problem."""
  code = face_files.parse_int(row[0], "emotion", range(7))
  return {"image": face_files.fer_pixels_to_png(row[1]),
          "expression": labels.to_affwild2("fer2013", code), "has_label": True,
          "source_label": code}


class Builder(base.ManualDirBuilder):
  """FER2013 face images with expression (Aff-Wild2 classes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(
        features.face_image_features(), description=__doc__,
        homepage="https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = face_files.find_file(self.manual_root(dl_manager), CSV_CANDIDATES, EXPECTED_LAYOUT)
    lines = split_lines(path, self.bad_data)
    return {split: self._generate_examples(path, split_lines_) for split, split_lines_ in lines.items()}

  def _generate_examples(self, path, lines: set[int]):
    """Yields (index, record) for the rows at ``lines``, in CSV order."""
    index = 0
    for line, row in face_files.csv_rows(path):
      if line not in lines:
        continue
      try:
        record = parse_row(row)
      except ValueError as problem:
        self.bad_data.report(path, line, str(problem))
        continue
      yield index, {**record, "source": f"{path.name}:{line}"}
      index += 1
    base.require_records(index, path)
