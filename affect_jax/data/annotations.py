"""Parse Aff-Wild2 annotation files (VA, EXPR, AU) and test-set video lists.

File format (one file per video and task): an optional header line, then line k of the body is
frame k (image ``%05d.jpg % k``). The header is detected as "the first line is not all numbers".
Bodies: VA ``v,a`` in [-1, 1] (-5 = invalid); EXPR one integer 0..7 (-1 = invalid); AU twelve
values in {0, 1} (-1 = invalid; any -1 makes the frame invalid for AU). CRLF line endings, a
missing final newline, a UTF-8 byte-order mark and trailing blank lines are accepted.

Parsed labels follow affect_jax.data.schema: where ``valid`` is False the values are the invalid
marker of the task (va -5, expr -1, au -1 everywhere), so an unmasked use stands out.
Problems go to a ``BadDataLog``: by default they raise naming ``file:line``; when skipping, the line
keeps its frame position and that frame is left unlabelled for the task.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from affect_jax.data import schema
from affect_jax.data.builders.bad_data import BadDataLog

INVALID_MARKER = {"va": -5, "expr": -1, "au": -1}
FIELD_NAMES = {"va": ("valence", "arousal"), "expr": ("expression",), "au": schema.AU_NAMES}
_VALUE_DTYPE = {"va": np.float32, "expr": np.int32, "au": np.int32}
_VALUE_SHAPE = {"va": (2,), "expr": (), "au": (len(schema.AU_NAMES),)}


@dataclasses.dataclass(frozen=True)
class TaskAnnotation:
  """Labels of one task for one video: row k-1 is frame k."""

  task: str
  path: str
  values: np.ndarray  # va float32[N, 2]; expr int32[N]; au int32[N, 12]
  valid: np.ndarray   # bool[N]

  @property
  def num_lines(self) -> int:
    return len(self.valid)


def invalid_labels(task: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """(values, valid) for ``num_frames`` frames without labels for ``task``."""
  values = np.full((num_frames,) + _VALUE_SHAPE[task], INVALID_MARKER[task], _VALUE_DTYPE[task])
  return values, np.zeros(num_frames, bool)


def label_lines(text: str) -> list[str]:
  """Physical lines of ``text`` (CRLF/LF, with or without final newline), trailing blanks dropped."""
  lines = text.splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  return lines


def parse_number(token: str) -> float | None:
  """The finite number in ``token``, or None (``nan``/``inf`` are not numbers here)."""
  try:
    value = float(token)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def is_header(line: str) -> bool:
  """True when ``line`` is not a comma-separated list of numbers."""
  return any(parse_number(token) is None for token in line.split(","))


def _parse_fields(task: str, line: str) -> list[float]:
  tokens = [token.strip() for token in line.split(",")] if line.strip() else []
  names = FIELD_NAMES[task]
  if len(tokens) != len(names):
    raise ValueError(
        f"expected {len(names)} comma-separated field(s) ({','.join(names)}), "
        f"found {len(tokens)} in {line!r}"
    )
  numbers = []
  for name, token in zip(names, tokens):
    number = parse_number(token)
    if number is None:
      raise ValueError(f"{name} field {token!r} is not a number")
    numbers.append(number)
  return numbers


def _check_class_value(task: str, name: str, number: float, allowed: range) -> int:
  marker = INVALID_MARKER[task]
  if number != int(number):
    raise ValueError(f"{name} value {number:g} is not an integer")
  if int(number) not in allowed and number != marker:
    raise ValueError(
        f"{name} value {number:g} not in {allowed.start}..{allowed.stop - 1} "
        f"and not the invalid marker {marker}"
    )
  return int(number)


def parse_label_line(task: str, line: str) -> tuple[np.ndarray | int, bool]:
  """(values, valid) of one body line; raises ValueError naming the problem."""
  numbers = _parse_fields(task, line)
  marker = INVALID_MARKER[task]
  if task == "va":
    for name, number in zip(FIELD_NAMES[task], numbers):
      if not -1.0 <= number <= 1.0 and number != marker:
        raise ValueError(f"{name} {number:g} outside [-1, 1] and not the invalid marker {marker}")
    valid = marker not in numbers
  elif task == "expr":
    numbers = [_check_class_value(task, "expression", numbers[0], range(len(schema.EXPR_CLASSES)))]
    valid = numbers[0] != marker
  elif task == "au":
    numbers = [_check_class_value(task, name, n, range(2)) for name, n in zip(schema.AU_NAMES, numbers)]
    valid = marker not in numbers
  else:
    raise ValueError(f"unknown task {task!r}; expected one of {schema.TASKS}")
  if not valid:
    numbers = [marker] * len(numbers)
  values = np.asarray(numbers, _VALUE_DTYPE[task]).reshape(_VALUE_SHAPE[task])
  return values, valid


def parse_annotation_text(
    text: str, task: str, path: os.PathLike | str, bad_data: BadDataLog
) -> TaskAnnotation | None:
  """Labels in ``text`` (the content of ``path``); None when the whole file is skipped."""
  lines = label_lines(text)
  first_body_line = 1 if lines and is_header(lines[0]) else 0
  body = lines[first_body_line:]
  if not body:
    bad_data.report(path, None, f"empty annotation file (no {task.upper()} label lines)")
    return None
  values, valid = invalid_labels(task, len(body))
  for index, line in enumerate(body):
    try:
      values[index], valid[index] = parse_label_line(task, line)
    except ValueError as problem:
      bad_data.report(path, first_body_line + index + 1, str(problem))
  return TaskAnnotation(task=task, path=str(path), values=values, valid=valid)


def read_text(path: os.PathLike | str, bad_data: BadDataLog) -> str | None:
  """UTF-8 text of ``path`` (byte-order mark dropped); None when skipped as undecodable."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    bad_data.report(path, raw.count(b"\n", 0, error.start) + 1, f"not UTF-8 text ({error.reason})")
    return None


def read_annotation_file(
    path: os.PathLike | str, task: str, bad_data: BadDataLog
) -> TaskAnnotation | None:
  """Parses one annotation file; None when the whole file is skipped."""
  text = read_text(path, bad_data)
  if text is None:
    return None
  return parse_annotation_text(text, task, path, bad_data)


def read_video_list(path: os.PathLike | str, bad_data: BadDataLog) -> list[tuple[int, str]]:
  """(line number, video id) per non-blank line of a test-set list file."""
  text = read_text(path, bad_data)
  if text is None:
    return []
  entries = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
  entries = [(number, name) for number, name in entries if name]
  if not entries:
    bad_data.report(path, None, "empty test-set video list")
  return entries
