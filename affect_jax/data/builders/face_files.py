"""Reading helpers shared by the face-image builders (AffectNet, RAF-DB, FER2013, FER+)."""

from __future__ import annotations

import csv
import io
from typing import Iterator

from etils import epath
import numpy as np
from PIL import Image

from affect_jax.data.builders.bad_data import BadDataLog, LayoutError, image_problem

FER_USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
FER_IMAGE_SIZE = 48


def find_file(root: epath.Path, candidates: tuple[str, ...], layout: str) -> epath.Path:
  """The first of ``root / candidate`` that exists, else a LayoutError listing them."""
  for candidate in candidates:
    if (root / candidate).is_file():
      return root / candidate
  raise LayoutError(
      f"none of {', '.join(str(root / c) for c in candidates)} exists\nExpected layout:\n{layout}"
  )


def csv_rows(path: epath.Path) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of every CSV row of ``path``; blank lines skipped."""
  with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    for row in reader:
      if row:
        yield reader.line_num, row


def parse_int(token: str, name: str, allowed: range | None = None) -> int:
  """``token`` as an integer (``"3"`` or ``"3.0"``), optionally within ``allowed``."""
  try:
    number = float(token)
  except ValueError:
    raise ValueError(f"{name} {token!r} is not a number") from None
  if not np.isfinite(number) or number != int(number):
    raise ValueError(f"{name} {token!r} is not an integer")
  if allowed is not None and int(number) not in allowed:
    raise ValueError(f"{name} {int(number)} not in {allowed.start}..{allowed.stop - 1}")
  return int(number)


def check_field_count(row: list[str], expected: int) -> None:
  if len(row) != expected:
    raise ValueError(f"expected {expected} fields, found {len(row)}")


def read_image(path: epath.Path, listed_at: str, bad_data: BadDataLog,
               verify_decode: bool) -> bytes | None:
  """The bytes of the image file listed at ``listed_at`` (``file:line``), or None when skipped."""
  if not path.is_file():
    bad_data.report(path, None, f"image file does not exist (listed at {listed_at})")
    return None
  data = path.read_bytes()
  problem = image_problem(data, verify_decode)
  if problem is not None:
    bad_data.report(path, None, f"{problem} (listed at {listed_at})")
    return None
  return data


def fer_pixels_to_png(pixels: str) -> bytes:
  """FER2013's 2304 space-separated grey values as 48x48 greyscale PNG bytes."""
  tokens = pixels.split()
  if len(tokens) != FER_IMAGE_SIZE * FER_IMAGE_SIZE:
    raise ValueError(f"pixels has {len(tokens)} values, expected {FER_IMAGE_SIZE ** 2}")
  try:
    values = np.array([int(token) for token in tokens])
  except ValueError:
    raise ValueError("pixels contains a value that is not an integer") from None
  if values.min() < 0 or values.max() > 255:
    raise ValueError(f"pixel values must be in 0..255, found {values.min()}..{values.max()}")
  image = Image.fromarray(values.astype(np.uint8).reshape(FER_IMAGE_SIZE, FER_IMAGE_SIZE))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def fer_split(usage: str) -> str:
  """TFDS split of a FER2013 / FER+ ``Usage`` value."""
  if usage not in FER_USAGE_TO_SPLIT:
    raise ValueError(f"Usage {usage!r} is not one of {', '.join(FER_USAGE_TO_SPLIT)}")
  return FER_USAGE_TO_SPLIT[usage]


def check_header(path: epath.Path, row: list[str], expected: tuple[str, ...]) -> None:
  """LayoutError unless ``row`` (the first CSV row) is ``expected``."""
  if tuple(field.strip() for field in row) != expected:
    raise LayoutError(f"{path}:1: header {','.join(row)!r} is not {','.join(expected)!r}")
