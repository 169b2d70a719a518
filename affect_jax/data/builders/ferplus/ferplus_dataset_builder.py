"""FER+ as TFDS: FER2013 pixels with the FER+ relabelling (10 taggers' votes per image).

Needs both ``fer2013new.csv`` (FER+) and ``fer2013.csv`` (pixels); row i of one is row i of the
other. Rows with an empty ``Image name`` (images FER+ dropped) are left out, counted in the metadata
(``empty_image_name_rows``). Splits from FER+'s ``Usage`` (Training/PublicTest/PrivateTest ->
train/validation/test), which must agree with FER2013's on the same row; records in CSV row order.

``votes`` keeps the ten vote counts (column order of labels.FERPLUS_VOTE_COLUMNS). The label is the
FER+ reference "majority" rule: drop single votes, then the top emotion needs more than half of the
remaining votes; otherwise, or when the majority is unknown / NF, ``expression`` is -1 and
``has_label`` False (``source_label`` is the winning FER+ column, -1 without a majority).
"""

from __future__ import annotations

import itertools

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from affect_jax.data import features, labels
from affect_jax.data.builders import base, face_files
from affect_jax.data.builders.bad_data import LayoutError

FERPLUS_CANDIDATES = ("fer2013new.csv", "FERPlus/fer2013new.csv")
# FER+ ships only the votes; the pixels come from FER2013's CSV, in the manual dir, a subfolder, or
# a sibling FER2013 folder (FERPlus/ next to FER2013/).
FER2013_CANDIDATES = ("fer2013.csv", "fer2013/fer2013.csv", "FER2013/fer2013.csv",
                      "../fer2013/fer2013.csv", "../FER2013/fer2013.csv")
HEADER = ("Usage", "Image name") + labels.FERPLUS_VOTE_COLUMNS
FER2013_HEADER = ("emotion", "pixels", "Usage")

EXPECTED_LAYOUT = """\
<manual_dir>/
  fer2013new.csv     (or FERPlus/fer2013new.csv) header Usage,Image name,neutral,happiness,
                     surprise,sadness,anger,disgust,fear,contempt,unknown,NF
  fer2013.csv        (or fer2013/ or FER2013/fer2013.csv, here or in a sibling folder)
                     header emotion,pixels,Usage; same row order"""


def majority_vote(votes: np.ndarray) -> int:
  """FER+ column with a strict majority once single votes are dropped, else -1."""
  kept = np.where(votes > 1, votes, 0)
  if kept.sum() == 0:
    return labels.NO_LABEL
  top = int(np.argmax(kept))
  return top if kept[top] * 2 > kept.sum() else labels.NO_LABEL


def parse_votes(row: list[str]) -> np.ndarray:
  """The ten vote counts of one FER+ row; ValueError names the problem."""
  votes = [face_files.parse_int(token, f"{name} votes", range(0, 1 << 30))
           for name, token in zip(labels.FERPLUS_VOTE_COLUMNS, row[2:])]
  return np.asarray(votes, np.int32)


def paired_rows(ferplus_path, fer2013_path):
  """Yields ((FER+ line, row), (FER2013 line, row)) data-row pairs; headers checked."""
  pairs = itertools.zip_longest(face_files.csv_rows(ferplus_path), face_files.csv_rows(fer2013_path))
  for index, (ferplus, fer2013) in enumerate(pairs):
    if ferplus is None or fer2013 is None:
      longer, entry = (fer2013_path, fer2013) if ferplus is None else (ferplus_path, ferplus)
      raise LayoutError(
          f"{longer}:{entry[0]}: {ferplus_path} and {fer2013_path} have different numbers of rows; "
          "FER+ rows must match FER2013 rows one to one")
    if index == 0:
      face_files.check_header(ferplus_path, ferplus[1], HEADER)
      face_files.check_header(fer2013_path, fer2013[1], FER2013_HEADER)
      continue
    yield ferplus, fer2013


class Builder(base.ManualDirBuilder):
  """FER+ face images (FER2013 pixels) with majority-vote expression and vote counts."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_LAYOUT

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(features.ferplus_features(len(labels.FERPLUS_VOTE_COLUMNS)),
                             description=__doc__, homepage="https://github.com/microsoft/FERPlus")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self.manual_root(dl_manager)
    ferplus_path = face_files.find_file(root, FERPLUS_CANDIDATES, EXPECTED_LAYOUT)
    fer2013_path = face_files.find_file(root, FER2013_CANDIDATES, EXPECTED_LAYOUT)
    lines = self._split_lines(ferplus_path, fer2013_path)
    return {split: self._generate_examples(ferplus_path, fer2013_path, split_lines)
            for split, split_lines in lines.items()}

  def _split_lines(self, ferplus_path, fer2013_path) -> dict[str, set[int]]:
    """FER+ line numbers of each split; rows without image name left out and counted."""
    lines = {split: set() for split in face_files.FER_USAGE_TO_SPLIT.values()}
    empty_names = 0
    for (line, row), (fer2013_line, fer2013_row) in paired_rows(ferplus_path, fer2013_path):
      try:
        face_files.check_field_count(row, len(HEADER))
        face_files.check_field_count(fer2013_row, len(FER2013_HEADER))
        split = face_files.fer_split(row[0])
        if row[0] != fer2013_row[2]:
          raise ValueError(f"Usage {row[0]!r} differs from {fer2013_path}:{fer2013_line} "
                           f"Usage {fer2013_row[2]!r}; the two files are not aligned")
      except ValueError as problem:
        self.bad_data.report(ferplus_path, line, str(problem))
        continue
      if not row[1].strip():
        empty_names += 1
        continue
      lines[split].add(line)
    logging.info("FER+: left out %d rows with an empty image name", empty_names)
    self.info.metadata["empty_image_name_rows"] = empty_names
    return lines

  def _generate_examples(self, ferplus_path, fer2013_path, lines: set[int]):
    """Yields (index, record) for the FER+ rows at ``lines``, in CSV order."""
    index = 0
    for (line, row), (fer2013_line, fer2013_row) in paired_rows(ferplus_path, fer2013_path):
      if line not in lines:
        continue
      try:
        votes = parse_votes(row)
      except ValueError as problem:
        self.bad_data.report(ferplus_path, line, str(problem))
        continue
      try:
        image = face_files.fer_pixels_to_png(fer2013_row[1])
      except ValueError as problem:
        self.bad_data.report(fer2013_path, fer2013_line, f"{problem} (FER+ row {ferplus_path}:{line})")
        continue
      code = majority_vote(votes)
      expression = labels.NO_LABEL if code == labels.NO_LABEL else labels.to_affwild2("ferplus", code)
      yield index, {"image": image, "expression": expression,
                    "has_label": expression != labels.NO_LABEL, "source_label": code,
                    "source": row[1].strip(), "votes": votes}
      index += 1
    base.require_records(index, ferplus_path)
