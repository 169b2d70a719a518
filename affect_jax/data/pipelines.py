"""Grain input pipelines: MAE images, fine-tuning frames, evaluation frames, temporal segments.

Every pipeline reads a random-access source (``__len__`` / ``__getitem__`` returning the dicts
of ``schema.py``: ``tfds.data_source(...)`` or the feature store in production, a list of dicts
in tests) and follows one recipe::

  MapDataset.source -> this process's contiguous share -> shuffle(seed) -> repeat
    -> random_map (decode + augment, per-example RNG derived from seed, index and epoch)
    -> to_iter_dataset(ReadOptions) -> batch -> mp_prefetch(num_workers)

Evaluation pipelines skip shuffle / repeat / augmentation, batch in order with the final batch
padded (``valid`` False on padding) and give every process the same number of batches, so every
example is processed exactly once and multi-host steps stay in lock-step.

Each builder returns a fresh ``grain.DatasetIterator``; ``get_state()`` / ``set_state()``
continue it exactly. To store it with the model in one Orbax checkpoint::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(new_iterator_from_same_builder_and_arguments)))

(``grain.checkpoint.CheckpointHandler`` writes one JSON state per JAX process.) A state saved
with ``num_workers > 0`` restores only into a pipeline with the same ``num_workers``.

``mp_prefetch`` (num_workers > 0) starts spawned worker processes: absl flags must be parsed
(run under ``absl.app.run``) and the entry point needs a ``__main__`` guard.

Face-image normalisation statistics live here and only here: `FACE_MEAN`, `FACE_STD`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import logging
from PIL import Image

from affect_jax.data import schema
from affect_jax.data import segments as segments_lib

# Per-channel RGB statistics of face crops (values in [0, 1]) used by the authors' feature
# extractor; the one place these numbers live.
FACE_MEAN = (0.471, 0.363, 0.333)
FACE_STD = (0.220, 0.193, 0.180)

MAE_CROP_SCALE = (0.2, 1.0)       # MAE's RandomResizedCrop area range.
FINETUNE_CROP_SCALE = (0.8, 1.0)  # Milder: the fine-tuning label must stay visible.
CROP_RATIO = (3 / 4, 4 / 3)

# Keys of output batches that are host-side metadata (strings): drop before device transfer.
METADATA_KEYS = ("video_id",)

_LABEL_KEYS = ("va", "va_valid", "expr", "expr_valid", "au", "au_valid")
_DEFAULT_READ_THREADS = 8


class RandomAccessSource(Protocol):
  """What Grain reads: ``tfds.data_source(...)``, the feature store, or a list of dicts."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...


class BadImageError(ValueError):
  """An image that Pillow cannot decode; the message names its video/frame or source/index."""


# ---------------------------------------------------------------------------------------------
# Process sharding and seeds.


def process_share(num_examples: int, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int, int]:
  """This process's contiguous share ``[start, stop)`` and the largest share of any process.

  Shares differ by at most one example (``numpy.array_split`` rule). Defaults to
  ``jax.process_index()`` / ``jax.process_count()``.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # Workers need not import jax.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  stop = start + base + (1 if process_index < extra else 0)
  return start, stop, base + (1 if extra else 0)


def _seeds(seed: int, count: int) -> list[int]:
  """``count`` independent 32-bit seeds derived from ``seed``."""
  return [int(s) for s in np.random.SeedSequence(seed).generate_state(count)]


def _sharded(ds: grain.MapDataset, what: str, process_index, process_count) -> grain.MapDataset:
  start, stop, _ = process_share(len(ds), process_index, process_count)
  if stop <= start:
    raise ValueError(f"{what}: {len(ds)} examples leave process {process_index} with none")
  return ds[start:stop]


def _read_options(read_threads: int, buffered_elements: int) -> grain.ReadOptions:
  # Grain's default buffer (500 elements) would hold ~300 MB of 224px float32 images per process.
  return grain.ReadOptions(num_threads=read_threads,
                           prefetch_buffer_size=max(buffered_elements, read_threads, 1))


def _finish(ds: grain.IterDataset, num_workers: int) -> grain.DatasetIterator:
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


# ---------------------------------------------------------------------------------------------
# Records.


class _IndexSelection(grain.transforms.DatasetSelectionMap):
  """Selects ``indices`` of one dataset (picklable, stateless)."""

  def __init__(self, indices: np.ndarray):
    self._indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> tuple[int, int]:
    # Like every MapDataset, indices past the end wrap around (what `repeat` relies on).
    return 0, int(self._indices[index % len(self._indices)])


def _subset(ds: grain.MapDataset, indices: np.ndarray) -> grain.MapDataset:
  return grain.MapDataset.select_from_datasets([ds], _IndexSelection(indices))


def _tag(index: int, record: Mapping[str, Any], source_index: int,
         source_length: int) -> dict[str, Any]:
  tagged = dict(record)
  # Indices past the end (later epochs of `repeat`) reach map_with_index unwrapped.
  tagged["record_index"] = np.int64(index % source_length)
  tagged["source_index"] = np.int32(source_index)
  return tagged


def _tagged_source(source: RandomAccessSource, source_index: int = 0) -> grain.MapDataset:
  if len(source) == 0:
    raise ValueError(f"source {source_index} is empty")
  return grain.MapDataset.source(source).map_with_index(
      functools.partial(_tag, source_index=source_index, source_length=len(source)))


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  return str(value)


def describe_record(record: Mapping[str, Any], source_name: str = "source") -> str:
  """``video <id> frame <nnnnn>.jpg`` for Aff-Wild2 frames, else ``<source> record <index>``."""
  if "video_id" in record and "frame" in record:
    return f"video {segments_lib.video_name(record)} frame {int(record['frame']):05d}.jpg"
  name = next((_text(record[k]) for k in ("source", "file_name", "path", "id") if k in record),
              None)
  where = f"{source_name} record {int(record.get('record_index', -1))}"
  return f"{where} ({name})" if name else where


def _has_image(record: Mapping[str, Any]) -> bool:
  """False only for Aff-Wild2 frames marked faceless; empty bytes otherwise fail in decoding."""
  return "has_face" not in record or bool(np.asarray(record["has_face"]))


# ---------------------------------------------------------------------------------------------
# Images.

_skipped_images = 0


def skipped_image_count() -> int:
  """Bad images skipped so far by this Python process (workers count separately)."""
  return _skipped_images


def decode_rgb(data: bytes, where: str) -> Image.Image:
  """Decodes JPEG/PNG bytes (any size, grey or colour) to an RGB Pillow image.

  Raises BadImageError naming ``where`` if the bytes are empty or undecodable.
  """
  if isinstance(data, np.ndarray):
    data = data.item()
  if data is None or len(data) == 0:
    raise BadImageError(f"{where}: empty image bytes")
  try:
    with Image.open(io.BytesIO(bytes(data))) as image:
      return image.convert("RGB")  # convert() also forces the full decode inside the try.
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise BadImageError(f"{where}: cannot decode image ({len(data)} bytes): {error}") from error


def _decode_or_skip(record: Mapping[str, Any], source_name: str,
                    skip_bad_images: bool) -> Image.Image | None:
  global _skipped_images
  where = describe_record(record, source_name)
  try:
    return decode_rgb(record["image"], where)
  except BadImageError as error:
    if not skip_bad_images:
      raise
    _skipped_images += 1
    logging.warning("Skipping bad image (%d so far in this process): %s", _skipped_images, error)
    return None


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop picks it.

  Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; after 10 misses a
  centre crop with the ratio clamped to ``ratio``.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return left, top, left + crop_w, top + crop_h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_h, crop_w = height, int(round(height * ratio[1]))
  else:
    crop_w, crop_h = width, height
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return left, top, left + crop_w, top + crop_h


def normalize_face_image(image: Image.Image | np.ndarray) -> np.ndarray:
  """uint8 RGB ``[H, W, 3]`` -> float32, ``(x / 255 - FACE_MEAN) / FACE_STD``."""
  pixels = np.asarray(image, dtype=np.float32)
  scale = 1.0 / (255.0 * np.asarray(FACE_STD, dtype=np.float32))
  shift = np.asarray(FACE_MEAN, dtype=np.float32) / np.asarray(FACE_STD, dtype=np.float32)
  return pixels * scale - shift


def augment_face_image(image: Image.Image, image_size: int, scale: tuple[float, float],
                       rng: np.random.Generator, flip: bool = True) -> np.ndarray:
  """Random resized crop (bicubic) to ``image_size``, random horizontal flip, normalise."""
  box = random_resized_crop_box(image.width, image.height, scale, CROP_RATIO, rng)
  image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
  if flip and rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return normalize_face_image(image)


def resize_face_image(image: Image.Image, image_size: int) -> np.ndarray:
  """Whole image resized (bicubic) to ``image_size`` square, normalised; no randomness."""
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return normalize_face_image(image)


# ---------------------------------------------------------------------------------------------
# (a) MAE pre-training images.


def _mae_example(record: Mapping[str, Any], rng: np.random.Generator, *, source_names,
                 image_size, crop_scale, skip_bad_images) -> dict[str, np.ndarray] | None:
  if not _has_image(record):
    return None  # Aff-Wild2 annotation-only frame: nothing to reconstruct.
  source_name = source_names[int(record["source_index"])]
  image = _decode_or_skip(record, source_name, skip_bad_images)
  if image is None:
    return None
  return {
      "image": augment_face_image(image, image_size, crop_scale, rng),
      "source_index": np.int32(record["source_index"]),
      "record_index": np.int64(record["record_index"]),
  }


def mae_images_pipeline(sources: Mapping[str, RandomAccessSource], *,
                        weights: Mapping[str, float] | None, batch_size: int, image_size: int,
                        seed: int, crop_scale: tuple[float, float] = MAE_CROP_SCALE,
                        num_workers: int = 0, read_threads: int = _DEFAULT_READ_THREADS,
                        skip_bad_images: bool = False, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Endless, shuffled, augmented face images for MAE pre-training, mixed across sources.

  Args:
    sources: name -> source of records with ``image`` (encoded JPEG/PNG bytes). Aff-Wild2
      ``frames`` sources qualify; their records with ``has_face`` False are dropped.
    weights: name -> mixing weight (normalised; ``None`` = equal). Each source is shuffled and
      repeated on its own, then drawn in these proportions (deterministic interleave), so small
      sources repeat more often.
    batch_size: per-process batch size (remainders dropped: the stream is endless).
    image_size: output side in pixels (e.g. 224; tiny configs smaller).
    seed: shuffles and augmentation are functions of this seed, the example index and epoch.
    num_workers: ``mp_prefetch`` worker processes (0 = in-process).
    skip_bad_images: False raises BadImageError on an undecodable image; True logs, counts
      (`skipped_image_count`) and drops it.

  Returns:
    Iterator of ``{"image": float32 [B, S, S, 3], "source_index": int32 [B],
    "record_index": int64 [B]}``.
  """
  names = list(sources)
  if not names:
    raise ValueError("mae_images_pipeline needs at least one source")
  if weights is not None and set(weights) != set(names):
    raise ValueError(f"weights name {sorted(weights)} but sources are {sorted(names)}")
  proportions = None if weights is None else [float(weights[n]) for n in names]
  if proportions is not None and min(proportions) <= 0:
    raise ValueError(f"mixing weights must be positive, got {dict(weights)}")
  shuffle_seeds = _seeds(seed, len(names) + 1)
  parts = []
  for i, name in enumerate(names):
    ds = _sharded(_tagged_source(sources[name], i), f"source {name}", process_index,
                  process_count)
    parts.append(ds.shuffle(shuffle_seeds[i]).repeat())
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, proportions)
  ds = ds.random_map(
      functools.partial(_mae_example, source_names=tuple(names), image_size=image_size,
                        crop_scale=tuple(crop_scale), skip_bad_images=skip_bad_images),
      seed=shuffle_seeds[-1])
  ds = ds.to_iter_dataset(_read_options(read_threads, 2 * batch_size))
  return _finish(ds.batch(batch_size, drop_remainder=True), num_workers)


# ---------------------------------------------------------------------------------------------
# (b) Fine-tuning frames.


def _is_expression_example(record: Mapping[str, Any]) -> bool:
  return _has_image(record) and bool(np.asarray(record["expr_valid"]))


def _expression_label(record: Mapping[str, Any]) -> int:
  """The EXPR class of a usable fine-tuning frame, -1 for any other frame."""
  return int(np.asarray(record["expr"])) if _is_expression_example(record) else -1


def scan_expression_labels(frames_source: RandomAccessSource,
                           read_threads: int = _DEFAULT_READ_THREADS) -> np.ndarray:
  """EXPR label of every record (-1 where no face or no valid label), read through Grain."""
  ds = grain.MapDataset.source(frames_source).map(_expression_label)
  return np.fromiter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads)),
                     dtype=np.int64, count=len(frames_source))


def _is_finetune_example(record: Mapping[str, Any], tasks: Sequence[str]) -> bool:
  return _has_image(record) and any(bool(np.asarray(record[f"{t}_valid"])) for t in tasks)


def _finetune_example(record: Mapping[str, Any], rng: np.random.Generator, *, image_size,
                      crop_scale, skip_bad_images, tasks=("expr",)) -> dict[str, np.ndarray] | None:
  if not _is_finetune_example(record, tasks):
    return None
  image = _decode_or_skip(record, "frames", skip_bad_images)
  if image is None:
    return None
  example = {
      "image": augment_face_image(image, image_size, crop_scale, rng),
      "label": np.int32(record["expr"]),
      "record_index": np.int64(record["record_index"]),
  }
  if tuple(tasks) != ("expr",):
    # Several tasks: every label with its mask (a frame may be labelled for some tasks only).
    for task in ("expr", "va", "au"):
      example[f"{task}_valid"] = np.bool_(task in tasks and bool(np.asarray(record[f"{task}_valid"])))
    example["va"] = np.asarray(record["va"], np.float32)
    example["au"] = np.asarray(record["au"], np.int32)
  return example


def finetune_frames_pipeline(frames_source: RandomAccessSource, *, batch_size: int,
                             image_size: int, seed: int,
                             crop_scale: tuple[float, float] = FINETUNE_CROP_SCALE,
                             class_balanced: bool = False, labels: np.ndarray | None = None,
                             num_workers: int = 0, read_threads: int = _DEFAULT_READ_THREADS,
                             skip_bad_images: bool = False, process_index: int | None = None,
                             process_count: int | None = None,
                             tasks: Sequence[str] = ("expr",)) -> grain.DatasetIterator:
  """Endless augmented Aff-Wild2 frames with a face and a valid EXPR label.

  With ``tasks`` naming more than EXPR (e.g. ``("expr", "va", "au")``), frames with a valid label
  for any of them are used, and each example also carries ``va``, ``au`` and the three
  ``*_valid`` masks.

  With ``class_balanced``, each class present gets its own shuffled, repeated stream and the
  streams are interleaved with equal weights: a frame is drawn with probability proportional to
  1 / (frequency of its class), deterministically. This needs every record's label:
  ``labels`` (as from `scan_expression_labels`) or, if None, a scan of the source.

  Returns:
    Iterator of ``{"image": float32 [B, S, S, 3], "label": int32 [B], "record_index": int64}``.
  """
  base = _tagged_source(frames_source)
  shuffle_seed, *class_seeds, augment_seed = _seeds(seed, len(schema.EXPR_CLASSES) + 2)
  if not class_balanced:
    ds = _sharded(base, "frames", process_index, process_count).shuffle(shuffle_seed).repeat()
  else:
    labels = scan_expression_labels(frames_source, read_threads) if labels is None else labels
    labels = np.asarray(labels)
    if labels.shape != (len(frames_source),):
      raise ValueError(f"labels has shape {labels.shape}, expected ({len(frames_source)},)")
    streams = []
    for label in np.unique(labels[labels >= 0]):
      members = _subset(base, np.flatnonzero(labels == label))
      members = _sharded(members, f"expression class {label}", process_index, process_count)
      streams.append(members.shuffle(class_seeds[int(label)]).repeat())
    if not streams:
      raise ValueError("no frame has a face and a valid EXPR label")
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams)
  ds = ds.random_map(
      functools.partial(_finetune_example, image_size=image_size, crop_scale=tuple(crop_scale),
                        skip_bad_images=skip_bad_images, tasks=tuple(tasks)), seed=augment_seed)
  ds = ds.to_iter_dataset(_read_options(read_threads, 2 * batch_size))
  return _finish(ds.batch(batch_size, drop_remainder=True), num_workers)


# ---------------------------------------------------------------------------------------------
# Evaluation: padding to equal per-process shares, then ordered batches with a `valid` mask.


def _mark_padding(record: dict[str, Any]) -> dict[str, Any]:
  record = dict(record)
  record["valid"] = False
  return record


def _mark_valid(record: dict[str, Any]) -> dict[str, Any]:
  record = dict(record)
  record["valid"] = True
  return record


def _ordered_eval_batches(ds: grain.MapDataset, transform: Callable, batch_size: int,
                          num_workers: int, read_threads: int, process_index,
                          process_count) -> grain.DatasetIterator:
  """This process's share in order, topped up with invalid copies to the largest share."""
  start, stop, largest = process_share(len(ds), process_index, process_count)
  share = ds[start:stop].map(_mark_valid)
  if stop - start < largest:
    filler = ds[0:1].repeat(largest - (stop - start)).map(_mark_padding)
    share = grain.MapDataset.concatenate([share, filler]) if stop > start else filler
  batches = share.map(transform).batch(
      batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                             batch_size=batch_size))
  # Batching before to_iter_dataset keeps batches in source order for any num_workers: the
  # worker processes take whole batches round-robin.
  return _finish(batches.to_iter_dataset(_read_options(read_threads, 2)), num_workers)


# (c) Evaluation / feature-extraction frames.


def _eval_frame(record: Mapping[str, Any], *, image_size, skip_bad_images) -> dict[str, Any]:
  image = None
  if _has_image(record):
    image = _decode_or_skip(record, "frames", skip_bad_images)
  out = {
      "image": (resize_face_image(image, image_size) if image is not None
                else np.zeros((image_size, image_size, 3), np.float32)),
      "has_face": np.bool_(image is not None),
      "valid": np.bool_(record["valid"]),
      "record_index": np.int64(record["record_index"]),
  }
  if "video_id" in record:
    out["video_id"] = np.str_(segments_lib.video_name(record))
  if "frame" in record:
    out["frame"] = np.int32(record["frame"])
  for key in _LABEL_KEYS:
    if key in record:
      value = np.asarray(record[key])
      out[key] = value & record["valid"] if key.endswith("_valid") else value
  return out


def eval_frames_pipeline(frames_source: RandomAccessSource, *, batch_size: int, image_size: int,
                         num_workers: int = 0, read_threads: int = _DEFAULT_READ_THREADS,
                         skip_bad_images: bool = False, process_index: int | None = None,
                         process_count: int | None = None) -> grain.DatasetIterator:
  """Every frame record of this process's share once, in order: resize + normalise only.

  Frames without a face image (and, with ``skip_bad_images``, undecodable ones, which are
  logged and counted) get an all-zero image and ``has_face`` False, so the frame sequence stays
  complete for the feature store. Padding rows have ``valid`` False and all ``*_valid`` False.

  Returns:
    Iterator of batches with ``image [B, S, S, 3]``, ``valid``, ``has_face``, ``record_index``
    and, when the records have them, ``video_id`` (str, host-only), ``frame`` and the labels.
  """
  return _ordered_eval_batches(
      _tagged_source(frames_source),
      functools.partial(_eval_frame, image_size=image_size, skip_bad_images=skip_bad_images),
      batch_size, num_workers, read_threads, process_index, process_count)


# ---------------------------------------------------------------------------------------------
# (d) Temporal segments from the feature store.


def video_lengths(feature_source: RandomAccessSource) -> np.ndarray:
  """``num_frames`` of every video record (reads each record once)."""
  return np.asarray([int(np.asarray(feature_source[i]["num_frames"]))
                     for i in range(len(feature_source))], dtype=np.int64)


def segment_table(num_frames: Sequence[int], window: int, stride: int) -> np.ndarray:
  """``[N, 2]`` int64 rows ``(video index, start)`` of every window of every video, in order."""
  rows = [(video, start) for video, count in enumerate(num_frames)
          for start in segments_lib.segment_starts(int(count), window, stride)]
  return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class _SegmentReader:
  """Cuts windows out of feature-store records (picklable for worker processes)."""

  def __init__(self, feature_source: RandomAccessSource, window: int, jitter: int = 0):
    self.feature_source = feature_source
    self.window = window
    self.jitter = jitter

  def _read(self, row: np.ndarray, rng: np.random.Generator | None):
    video, start = int(row[0]), int(row[1])
    record = self.feature_source[video]
    num_frames = segments_lib.check_video_record(record)
    if rng is not None:
      start = segments_lib.jittered_start(start, num_frames, self.window, self.jitter, rng)
    segment = segments_lib.cut_window(record, start, self.window)
    segment["features"] = segment["features"].astype(np.float32)
    segment["video_index"] = np.int64(video)
    return record, segment

  def random(self, row: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    return self._read(row, rng)[1]

  def ordered(self, item: Mapping[str, Any]) -> dict[str, Any]:
    record, segment = self._read(item["row"], None)
    valid = bool(item["valid"])
    segment["segment_valid"] = np.bool_(valid)
    segment["video_id"] = np.str_(segments_lib.video_name(record))
    if not valid:
      for key in ("frame_mask", "va_valid", "expr_valid", "au_valid"):
        segment[key][:] = False
    return segment


def train_segments_pipeline(feature_source: RandomAccessSource, *, batch_size: int,
                            window: int = 300, stride: int = 200, jitter: int = 0, seed: int,
                            num_frames: Sequence[int] | None = None, num_workers: int = 0,
                            read_threads: int = _DEFAULT_READ_THREADS,
                            process_index: int | None = None,
                            process_count: int | None = None) -> grain.DatasetIterator:
  """Endless shuffled training windows ``w`` frames long, one every ``s`` frames of each video.

  Windows follow `segments.segment_starts` (tail window included). With ``jitter > 0`` each
  window's start moves by a uniform integer in ``[-jitter, jitter]`` (clipped into the video),
  drawn per example and per epoch from ``seed``.

  Args:
    num_frames: frames per video if known (saves one pass over the store).

  Returns:
    Iterator of ``features [B, w, D]`` float32, ``frame_mask [B, w]``, ``has_face``, ``va``
    ``[B, w, 2]``, ``expr [B, w]``, ``au [B, w, 12]``, their ``*_valid [B, w]`` masks (False on
    padding and unlabelled videos), ``start`` and ``video_index`` ``[B]``.
  """
  lengths = video_lengths(feature_source) if num_frames is None else np.asarray(num_frames)
  table = segment_table(lengths, window, stride)
  shuffle_seed, jitter_seed = _seeds(seed, 2)
  reader = _SegmentReader(feature_source, window, jitter)
  ds = _sharded(grain.MapDataset.source(table), "segments", process_index, process_count)
  ds = ds.shuffle(shuffle_seed).repeat().random_map(reader.random, seed=jitter_seed)
  ds = ds.to_iter_dataset(_read_options(read_threads, 2 * batch_size))
  return _finish(ds.batch(batch_size, drop_remainder=True), num_workers)


def _segment_item(row: np.ndarray) -> dict[str, Any]:
  return {"row": row}


def eval_segments_pipeline(feature_source: RandomAccessSource, *, batch_size: int,
                           window: int = 300, stride: int = 200,
                           num_frames: Sequence[int] | None = None, num_workers: int = 0,
                           read_threads: int = _DEFAULT_READ_THREADS,
                           process_index: int | None = None,
                           process_count: int | None = None) -> grain.DatasetIterator:
  """All windows of all videos once, in order, covering every frame (no jitter, no shuffle).

  Batches carry the training fields plus ``segment_valid [B]`` (False on padding rows) and
  ``video_id`` (str, host-only). Feed ``video_index``, ``start``, ``segment_valid``,
  ``frame_mask`` and the model outputs to `segments.merge_batched_segments` to get exactly one
  prediction per frame.
  """
  lengths = video_lengths(feature_source) if num_frames is None else np.asarray(num_frames)
  table = grain.MapDataset.source(segment_table(lengths, window, stride)).map(_segment_item)
  reader = _SegmentReader(feature_source, window)
  return _ordered_eval_batches(table, reader.ordered, batch_size, num_workers,
                               read_threads, process_index, process_count)

