"""AffectNet (manually annotated part) as TFDS.

Splits: ``train`` from training.csv, ``validation`` from validation.csv, records in CSV row order.
Every listed image is kept, including codes 8 None / 9 Uncertain / 10 Non-face (``expression`` -1,
``has_label`` False; ``source_label`` keeps the code so a pipeline can drop non-faces), since MAE
pre-training uses unlabelled faces. Images are stored as-is (the full image; ``face_box`` is the
annotated face rectangle x, y, width, height). Valence/arousal: ``va_valid`` False where the file
says -2, and then ``va`` holds -2.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from affect_jax.data import features, labels
from affect_jax.data.builders import base, face_files

CSV_FILES = {"train": "training.csv", "validation": "validation.csv"}
CSV_FOLDERS = ("", "Manually_Annotated_file_lists")
IMAGE_FOLDER = "Manually_Annotated_Images"
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "facial_landmarks", "expression", "valence", "arousal")
NO_VA = -2.0

EXPECTED_LAYOUT = """\
<manual_dir>/
  training.csv, validation.csv          (or under Manually_Annotated_file_lists/)
      columns: subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,
               expression,valence,arousal
  Manually_Annotated_Images/<subDirectory_filePath>"""


def is_header(row: list[str]) -> bool:
  """The first row is a header when its expression field is not a number."""
  try:
    float(row[COLUMNS.index("expression")])
  except (IndexError, ValueError):
    return True
  return False


def parse_va(row: list[str]) -> tuple[np.ndarray, bool]:
  """(valence, arousal) and whether they are valid (-2 marks "none")."""
  va = []
  for name in ("valence", "arousal"):
    token = row[COLUMNS.index(name)]
    try:
      value = float(token)
    except ValueError:
      raise ValueError(f"{name} {token!r} is not a number") from None
    if not (-1.0 <= value <= 1.0 or value == NO_VA):
      raise ValueError(f"{name} {value:g} outside [-1, 1] and not the no-value marker -2")
    va.append(value)
  valid = NO_VA not in va
  return np.asarray(va if valid else [NO_VA, NO_VA], np.float32), valid


def parse_row(row: list[str]) -> dict:
  """Labels of one CSV row (everything but the image); ValueError names the problem."""
  face_files.check_field_count(row, len(COLUMNS))
  code = face_files.parse_int(row[COLUMNS.index("expression")], "expression",
                              range(len(labels.EXPRESSION_TABLE["affectnet"])))
  expression = labels.to_affwild2("affectnet", code)
  va, va_valid = parse_va(row)
  face_box = [face_files.parse_int(row[COLUMNS.index(name)], name) for name in COLUMNS[1:5]]
  return {
      "expression": expression,
      "has_label": expression != labels.NO_LABEL,
      "source_label": code,
      "source": row[0],
      "va": va,
      "va_valid": va_valid,
      "face_box": np.asarray(face_box, np.int32),
  }


class Builder(base.ManualDirBuilder):
  """AffectNet face images with expression (Aff-Wild2 classes), valence and arousal."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(features.affectnet_features(), description=__doc__,
                             homepage="http://mohammadmahoor.com/affectnet/")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual_root(dl_manager)
    image_root = base.require(root / IMAGE_FOLDER, "AffectNet image folder", EXPECTED_LAYOUT)
    csv_paths = {
        split: face_files.find_file(root, tuple(f"{folder}/{name}".lstrip("/") for folder in CSV_FOLDERS),
                                    EXPECTED_LAYOUT)
        for split, name in CSV_FILES.items()
    }
    return {split: self._generate_examples(path, image_root) for split, path in csv_paths.items()}

  def _generate_examples(self, csv_path, image_root):
    """Yields (row index, record) in CSV order."""
    index = 0
    for line, row in face_files.csv_rows(csv_path):
      if line == 1 and is_header(row):
        continue
      try:
        record = parse_row(row)
      except ValueError as problem:
        self.bad_data.report(csv_path, line, str(problem))
        continue
      image = face_files.read_image(image_root / row[0], f"{csv_path}:{line}", self.bad_data,
                                    self.verify_decode)
      if image is None:
        continue
      yield index, {"image": image, **record}
      index += 1
    base.require_records(index, csv_path)
