"""The five train/validation folds of the paper's Table 1.

Fold 0 is the official Aff-Wild2 Train/Validation split. Folds 1..K (K = ``num_folds`` = 4) come
from one deterministic K-way partition by video of Train ∪ Validation: fold k validates on part
k-1 and trains on the other parts.

Grouping: ``<id>_left`` and ``<id>_right`` are two subjects of the same recording, so they are
kept in the same part (grouped by the id with the suffix removed); otherwise the same scene and
background would sit on both sides of a fold.

Partition: groups are sorted, permuted with ``numpy.random.default_rng(seed)``, then assigned
greedily, each to the part with the smallest total weight so far (ties: lowest part). Weights
default to one per video; pass frame counts to balance parts by frames instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

_SUBJECT_SUFFIXES = ("_left", "_right")


def recording_id(video_id: str) -> str:
  """The video id without a ``_left`` / ``_right`` subject suffix."""
  for suffix in _SUBJECT_SUFFIXES:
    if video_id.endswith(suffix):
      return video_id[: -len(suffix)]
  return video_id


def partition_videos(video_ids: Iterable[str], num_folds: int = 4, seed: int = 0,
                     weights: Mapping[str, float] | None = None) -> list[list[str]]:
  """Splits videos into ``num_folds`` disjoint parts, ``_left``/``_right`` pairs together.

  Returns:
    ``num_folds`` sorted lists of video ids whose union is the set of ``video_ids``.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be at least 2, got {num_folds}")
  videos = sorted(set(video_ids))
  groups: dict[str, list[str]] = {}
  for video in videos:
    groups.setdefault(recording_id(video), []).append(video)
  if len(groups) < num_folds:
    raise ValueError(f"{len(groups)} recordings cannot fill {num_folds} folds")
  if weights is not None:
    missing = [v for v in videos if v not in weights]
    if missing:
      raise ValueError(f"weights lack videos {missing[:5]} ({len(missing)} in all)")
  names = sorted(groups)
  order = np.random.default_rng(seed).permutation(len(names))
  parts: list[list[str]] = [[] for _ in range(num_folds)]
  totals = np.zeros(num_folds)
  for i in order:
    members = groups[names[i]]
    part = int(np.argmin(totals))
    parts[part].extend(members)
    totals[part] += sum(weights[v] for v in members) if weights is not None else len(members)
  return [sorted(part) for part in parts]


def fold_videos(train_ids: Sequence[str], val_ids: Sequence[str], fold: int, num_folds: int = 4,
                seed: int = 0,
                weights: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
  """(train ids, validation ids) of ``fold``: 0 = official split, 1..num_folds = K-fold parts.

  A video listed in both official splits (possible across tasks) counts once.
  """
  if not 0 <= fold <= num_folds:
    raise ValueError(f"fold must be in [0, {num_folds}], got {fold}")
  if fold == 0:
    return sorted(set(train_ids)), sorted(set(val_ids))
  parts = partition_videos(list(train_ids) + list(val_ids), num_folds, seed, weights)
  val = parts[fold - 1]
  train = sorted(v for k, part in enumerate(parts) if k != fold - 1 for v in part)
  return train, val
