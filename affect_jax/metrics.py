"""ABAW evaluation metrics as mergeable sufficient statistics.

The challenge scores every frame of every video concatenated (never per video, never
per segment), so evaluation accumulates *statistics* batch by batch, on device, and
turns them into scores only once at the end:

  stats = metrics.va_stats(pred, target, valid)        # jitted, per batch
  total = metrics.merge(total, stats)                  # associative
  scores = metrics.compute(total)                      # host, dict[str, float]

Three statistic types, one per task, share this contract:

  ``VAStats``   per-dimension count / means / centred second moments / co-moment,
                merged with Chan et al.'s parallel formula in compensated
                ("float-float") float32. Raw sums of squares lose ~1e-5 of CCC in
                float32 when means are far from 0, and plain float32 accumulation
                drifts by ~sqrt(#batches) ulps (~1e-6 of CCC over 1e5 frames); this
                form stays within ~1e-8 of float64 in batches of any size. The
                error-free sums rely on IEEE float32 without reassociation, which is
                XLA's default (no fast-math).
  ``ExprStats`` an 8x8 int32 confusion matrix (rows = truth, columns = prediction).
  ``AUStats``   int32 per-AU TP/FP/FN at the decision thresholds (0.5 by default) and
                on a threshold grid (0.1 .. 0.9) for per-AU threshold tuning.

Each type provides ``empty()``, ``merge(other)``, ``all_reduce(axis_name)`` and
``compute()``.

Across devices: when a batch is a global ``jax.Array`` sharded over devices, calling
the ``*_stats`` function under ``jax.jit`` already yields global statistics (XLA
inserts the reductions). Inside ``shard_map``/``pmap`` use ``stats.all_reduce(axis)``:
for ``ExprStats``/``AUStats`` (integer counts) it is a ``psum``; ``VAStats`` is not a
plain sum, so it ``all_gather``s the per-device statistics (a few dozen floats) and
folds them with ``merge``. A stack of statistics along a leading axis collapses with
``merge_stacked``.

Labels that cannot be right (EXPR class outside 0..7, AU label other than 0/1 on a
frame marked valid) cannot raise inside ``jit``; they are counted in ``bad_labels``
and ``compute()`` raises ``ValueError``, so they never silently vanish from a score.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

VA_NAMES = ("valence", "arousal")
EXPR_NAMES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise",
              "Other")
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24",
            "AU25", "AU26")
NUM_EXPR_CLASSES = len(EXPR_NAMES)
NUM_AUS = len(AU_NAMES)
DEFAULT_AU_THRESHOLD = 0.5
# Written out rather than np.arange(0.1, 1, 0.1) so that 0.3 is 0.3, not 0.30000000000000004.
THRESHOLD_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _check_mask(valid: jax.Array, frames_shape: tuple[int, ...], name: str) -> jax.Array:
  if tuple(valid.shape) != tuple(frames_shape):
    raise ValueError(f"{name}: valid mask shape {tuple(valid.shape)} != frames shape "
                     f"{tuple(frames_shape)}")
  return valid.astype(bool).reshape(-1)


def _binary_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
  """sklearn's F1 = 2TP / (2TP + FP + FN), and 0 where that is 0/0 (zero_division=0)."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  denominator = 2.0 * tp + fp + fn
  return np.where(denominator > 0, 2.0 * tp / np.where(denominator > 0, denominator, 1.0),
                  0.0)


def _raise_on_bad_labels(bad_labels: Any, task: str) -> None:
  count = int(jax.device_get(bad_labels))
  if count:
    raise ValueError(
        f"{task} metrics: {count} frame(s) marked valid carry a label outside the task's "
        f"label set (see metrics.{task.lower()}_stats); fix the labels or the valid mask")


# --------------------------------------------------------------------------- VA / CCC


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's error-free sum: a + b == s + err exactly (IEEE round-to-nearest)."""
  s = a + b
  b_virtual = s - a
  err = (a - (s - b_virtual)) + (b - b_virtual)
  return s, err


def _add_compensated(hi, lo, *terms):
  """(hi, lo) + terms as a renormalised (hi, lo) pair of float32 values."""
  for term in terms:
    hi, err = _two_sum(hi, term)
    lo = lo + err
  return _two_sum(hi, lo)


@flax.struct.dataclass
class Moments:
  """Per-dimension means and centred (co-)moments; each field is [D] float32."""
  mean_pred: jax.Array
  mean_target: jax.Array
  m2_pred: jax.Array  # sum of (p - mean_p)^2
  m2_target: jax.Array  # sum of (t - mean_t)^2
  comoment: jax.Array  # sum of (p - mean_p)(t - mean_t)

  @classmethod
  def zeros(cls, num_dims: int) -> "Moments":
    return cls(*(jnp.zeros((num_dims,), jnp.float32) for _ in range(5)))


@flax.struct.dataclass
class VAStats:
  """Sufficient statistics of CCC over the valid frames seen so far.

  count: [] int32 number of valid frames. ``moments`` holds the float32 values and
  ``moments_lo`` their rounding errors (value = moments + moments_lo, a
  "float-float" pair): a stream of thousands of small batches would otherwise drift
  by ~sqrt(#merges) float32 ulps, i.e. ~1e-5 of CCC.
  """
  count: jax.Array
  moments: Moments
  moments_lo: Moments

  @classmethod
  def empty(cls, num_dims: int = len(VA_NAMES)) -> "VAStats":
    return cls(jnp.zeros((), jnp.int32), Moments.zeros(num_dims), Moments.zeros(num_dims))

  def merge(self, other: "VAStats") -> "VAStats":
    return _merge_va(self, other)

  def all_reduce(self, axis_name: Any) -> "VAStats":
    """Global statistics over a named mapped axis (shard_map / pmap / vmap).

    Gathers the (tiny) per-device statistics and folds them with ``merge``.
    """
    return _merge_stacked_va(jax.lax.all_gather(self, axis_name))

  def compute(self) -> dict[str, float]:
    """CCC per dimension and P_VA (their mean), in float64 on the host.

    CCC = 2 C / (M2_p + M2_t + N (mean_p - mean_t)^2) (the 1/N of the population
    statistics cancels). Where that denominator is 0 — predictions and labels both
    constant *and* equal, e.g. a single frame predicted exactly — CCC is undefined
    and reported as 0, the value the eps-guarded loss gives. A constant prediction
    (or label) alone gives CCC 0, as its covariance is 0. No valid frame: NaN.
    """
    s = jax.device_get(self)
    value = {name: np.asarray(getattr(s.moments, name), np.float64)
                   + np.asarray(getattr(s.moments_lo, name), np.float64)
             for name in ("mean_pred", "mean_target", "m2_pred", "m2_target", "comoment")}
    count = float(s.count)
    denominator = (value["m2_pred"] + value["m2_target"]
                   + count * (value["mean_pred"] - value["mean_target"])**2)
    if count == 0:
      ccc = np.full(denominator.shape, np.nan)
    else:
      ccc = np.where(denominator > 0, 2.0 * value["comoment"]
                     / np.where(denominator > 0, denominator, 1.0), 0.0)
    names = VA_NAMES if ccc.shape[0] == len(VA_NAMES) else tuple(
        f"dim{i}" for i in range(ccc.shape[0]))
    out = {f"ccc_{name}": float(v) for name, v in zip(names, ccc)}
    out["p_va"] = float(np.mean(ccc))
    out["num_frames"] = count
    return out


def _merge_va_impl(a: VAStats, b: VAStats) -> VAStats:
  """Chan et al.'s pairwise update, carried out in compensated float32.

  With n = n_a + n_b, f = n_b / n and delta = mean_b - mean_a:
    mean = mean_a + f delta,  M2 = M2_a + M2_b + n_a f delta^2,
    C = C_a + C_b + n_a f delta_p delta_t.
  """
  count = a.count + b.count
  fraction_b = jnp.where(count > 0, b.count / jnp.maximum(count, 1), 0.0).astype(jnp.float32)
  weight = a.count.astype(jnp.float32) * fraction_b
  hi_a, lo_a, hi_b, lo_b = a.moments, a.moments_lo, b.moments, b.moments_lo
  delta_pred = (hi_b.mean_pred - hi_a.mean_pred) + (lo_b.mean_pred - lo_a.mean_pred)
  delta_target = (hi_b.mean_target - hi_a.mean_target) + (lo_b.mean_target - lo_a.mean_target)

  def add(name, *terms):
    return _add_compensated(getattr(hi_a, name), getattr(lo_a, name), *terms)

  fields = {
      "mean_pred": add("mean_pred", fraction_b * delta_pred),
      "mean_target": add("mean_target", fraction_b * delta_target),
      "m2_pred": add("m2_pred", hi_b.m2_pred, lo_b.m2_pred, weight * delta_pred**2),
      "m2_target": add("m2_target", hi_b.m2_target, lo_b.m2_target,
                       weight * delta_target**2),
      "comoment": add("comoment", hi_b.comoment, lo_b.comoment,
                      weight * delta_pred * delta_target),
  }
  return VAStats(count=count,
                 moments=Moments(**{k: v[0] for k, v in fields.items()}),
                 moments_lo=Moments(**{k: v[1] for k, v in fields.items()}))


_merge_va = jax.jit(_merge_va_impl)


def _merge_stacked_va(stacked: VAStats) -> VAStats:
  num_dims = stacked.moments.mean_pred.shape[-1]
  merged, _ = jax.lax.scan(lambda acc, s: (_merge_va_impl(acc, s), None),
                           VAStats.empty(num_dims), stacked)
  return merged


_merge_stacked_va_jit = jax.jit(_merge_stacked_va)


@jax.jit
def va_stats(pred: jax.Array, target: jax.Array, valid: jax.Array) -> VAStats:
  """Statistics of one batch: pred, target [..., D] (D=2), valid [...] bool.

  Two-pass within the batch: the mean is refined by the mean residual and the
  second moments are taken about it (corrected two-pass algorithm), so float32 stays
  accurate when the mean is far from zero.
  """
  if pred.shape != target.shape:
    raise ValueError(f"va_stats: pred shape {pred.shape} != target shape {target.shape}")
  mask = _check_mask(valid, pred.shape[:-1], "va_stats")
  dims = pred.shape[-1]
  weight = mask[:, None].astype(jnp.float32)
  pred = jnp.where(mask[:, None], pred.reshape(-1, dims), 0.0).astype(jnp.float32)
  target = jnp.where(mask[:, None], target.reshape(-1, dims), 0.0).astype(jnp.float32)
  count = jnp.sum(mask, dtype=jnp.int32)
  inv_count = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1), 0.0).astype(jnp.float32)

  def centred(x):
    rough_mean = jnp.sum(x, axis=0) * inv_count
    deviation = (x - rough_mean) * weight
    correction = jnp.sum(deviation, axis=0) * inv_count
    mean_hi, mean_lo = _two_sum(rough_mean, correction)
    # A constant column must give exactly zero spread; rounding noise in its mean
    # would otherwise make e.g. CCC(const, same const) a random 0 or 1.
    largest = jnp.max(jnp.where(mask[:, None], x, -jnp.inf), axis=0)
    smallest = jnp.min(jnp.where(mask[:, None], x, jnp.inf), axis=0)
    constant = (largest == smallest)
    mean_hi = jnp.where(constant, largest, mean_hi)
    mean_lo = jnp.where(constant, 0.0, mean_lo)
    return mean_hi, mean_lo, jnp.where(constant, 0.0, deviation - correction * weight)

  mean_pred, mean_pred_lo, dev_pred = centred(pred)
  mean_target, mean_target_lo, dev_target = centred(target)
  zeros = jnp.zeros((dims,), jnp.float32)
  return VAStats(
      count=count,
      moments=Moments(mean_pred=mean_pred, mean_target=mean_target,
                      m2_pred=jnp.sum(dev_pred**2, axis=0),
                      m2_target=jnp.sum(dev_target**2, axis=0),
                      comoment=jnp.sum(dev_pred * dev_target, axis=0)),
      moments_lo=Moments(mean_pred=mean_pred_lo, mean_target=mean_target_lo,
                         m2_pred=zeros, m2_target=zeros, comoment=zeros))


# --------------------------------------------------------------------------- EXPR


@flax.struct.dataclass
class ExprStats:
  """confusion: [C, C] int32, rows = true class, columns = predicted class.

  bad_labels: [] int32 count of valid frames whose label or predicted index is
  outside [0, C); ``compute`` refuses to score when it is non-zero.
  """
  confusion: jax.Array
  bad_labels: jax.Array

  @classmethod
  def empty(cls, num_classes: int = NUM_EXPR_CLASSES) -> "ExprStats":
    return cls(jnp.zeros((num_classes, num_classes), jnp.int32), jnp.zeros((), jnp.int32))

  def merge(self, other: "ExprStats") -> "ExprStats":
    return _sum_stats(self, other)

  def all_reduce(self, axis_name: Any) -> "ExprStats":
    return jax.lax.psum(self, axis_name)

  def compute(self) -> dict[str, float]:
    """Macro F1 over *all* C classes and accuracy.

    Same as ``sklearn.metrics.f1_score(y, p, labels=range(C), average="macro",
    zero_division=0)``: a class absent from both truth and prediction counts as
    F1 = 0 and still divides the sum by C (the challenge divides by 8). No valid
    frame gives NaN for both.
    """
    _raise_on_bad_labels(self.bad_labels, "EXPR")
    confusion = np.asarray(jax.device_get(self.confusion), np.int64)
    true_positive = np.diag(confusion)
    f1 = _binary_f1(true_positive, confusion.sum(axis=0) - true_positive,
                    confusion.sum(axis=1) - true_positive)
    total = confusion.sum()
    out = {"expr_f1": float(np.mean(f1)) if total else float("nan"),
           "expr_accuracy": float(true_positive.sum() / total) if total else float("nan"),
           "num_frames": float(total)}
    if confusion.shape[0] == NUM_EXPR_CLASSES:
      out.update({f"expr_f1_{name}": float(v) for name, v in zip(EXPR_NAMES, f1)})
    return out


@jax.jit
def _sum_stats(a, b):
  return jax.tree.map(jnp.add, a, b)


@jax.jit
def expr_stats(pred: jax.Array, labels: jax.Array, valid: jax.Array) -> ExprStats:
  """Confusion counts of one batch.

  Args:
    pred: either logits/probabilities [..., C] (argmax is taken) or integer class
      indices [...] (e.g. after test-time mode filtering).
    labels: [...] int, 0..C-1 on valid frames.
    valid: [...] bool.
  """
  if pred.ndim == labels.ndim + 1:
    num_classes = pred.shape[-1]
    pred = jnp.argmax(pred, axis=-1)
  elif pred.shape == labels.shape and jnp.issubdtype(pred.dtype, jnp.integer):
    num_classes = NUM_EXPR_CLASSES
  else:
    raise ValueError(f"expr_stats: pred must be [..., C] scores or integer class indices "
                     f"shaped like labels {labels.shape}; got {pred.shape} {pred.dtype}")
  mask = _check_mask(valid, labels.shape, "expr_stats")
  labels = labels.reshape(-1).astype(jnp.int32)
  pred = pred.reshape(-1).astype(jnp.int32)
  in_range = ((labels >= 0) & (labels < num_classes) & (pred >= 0) & (pred < num_classes))
  counted = mask & in_range
  cell = jnp.where(counted, labels * num_classes + pred, 0)
  confusion = jnp.zeros((num_classes * num_classes,), jnp.int32).at[cell].add(
      counted.astype(jnp.int32))
  return ExprStats(confusion=confusion.reshape(num_classes, num_classes),
                   bad_labels=jnp.sum(mask & ~in_range, dtype=jnp.int32))


# --------------------------------------------------------------------------- AU


@flax.struct.dataclass
class AUStats:
  """Per-AU counts. tp/fp/fn: [K] int32 at the decision thresholds used in ``au_stats``;
  grid_tp/grid_fp/grid_fn: [T, K] int32 at each threshold of ``grid`` (static).
  count: [] int32 valid frames; bad_labels: [] int32 valid frames with a label other
  than 0/1.
  """
  count: jax.Array
  tp: jax.Array
  fp: jax.Array
  fn: jax.Array
  grid_tp: jax.Array
  grid_fp: jax.Array
  grid_fn: jax.Array
  bad_labels: jax.Array
  grid: tuple[float, ...] = flax.struct.field(pytree_node=False, default=THRESHOLD_GRID)

  @classmethod
  def empty(cls, num_aus: int = NUM_AUS,
            grid: Sequence[float] = THRESHOLD_GRID) -> "AUStats":
    grid = _as_grid(grid)
    per_au = jnp.zeros((num_aus,), jnp.int32)
    per_grid = jnp.zeros((len(grid), num_aus), jnp.int32)
    scalar = jnp.zeros((), jnp.int32)
    return cls(scalar, per_au, per_au, per_au, per_grid, per_grid, per_grid, scalar, grid)

  def merge(self, other: "AUStats") -> "AUStats":
    if self.grid != other.grid:
      raise ValueError(f"AUStats.merge: threshold grids differ: {self.grid} vs {other.grid}")
    return _sum_stats(self, other)

  def all_reduce(self, axis_name: Any) -> "AUStats":
    return jax.lax.psum(self, axis_name)

  def compute(self) -> dict[str, float]:
    """Mean over AUs of binary F1 at the decision thresholds (sklearn semantics,
    zero_division=0), per-AU F1, and the number of frames scored."""
    _raise_on_bad_labels(self.bad_labels, "AU")
    s = jax.device_get(self)
    f1 = _binary_f1(s.tp, s.fp, s.fn)
    out = {"au_f1": float(np.mean(f1)), "num_frames": float(s.count)}
    if f1.shape[0] == NUM_AUS:
      out.update({f"au_f1_{name}": float(v) for name, v in zip(AU_NAMES, f1)})
    return out

  def tune_thresholds(self) -> tuple[np.ndarray, np.ndarray, float]:
    """Best grid threshold per AU on these statistics.

    Returns (thresholds [K], per-AU F1 at them [K], mean F1). Ties go to the lowest
    threshold. This score is optimistic on the set it was tuned on; report it apart
    from the 0.5 score and apply the thresholds to another set with
    ``au_stats(..., thresholds=thresholds)``.
    """
    _raise_on_bad_labels(self.bad_labels, "AU")
    s = jax.device_get(self)
    f1 = _binary_f1(s.grid_tp, s.grid_fp, s.grid_fn)  # [T, K]
    best = np.argmax(f1, axis=0)  # first maximum = lowest threshold
    best_f1 = f1[best, np.arange(f1.shape[1])]
    return np.asarray(self.grid, np.float64)[best], best_f1, float(np.mean(best_f1))


def _as_grid(grid: Sequence[float]) -> tuple[float, ...]:
  grid = tuple(float(t) for t in grid)
  if not grid or any(not 0.0 < t < 1.0 for t in grid):
    raise ValueError(f"AU threshold grid must be non-empty values in (0, 1); got {grid}")
  return grid


def au_stats(scores: jax.Array, labels: jax.Array, valid: jax.Array, *,
             thresholds: Any = DEFAULT_AU_THRESHOLD, grid: Sequence[float] = THRESHOLD_GRID,
             from_logits: bool = True) -> AUStats:
  """Per-AU TP/FP/FN of one batch.

  A frame is predicted positive for an AU when its probability is >= the threshold.

  Args:
    scores: [..., K] logits (``from_logits=True``) or probabilities.
    labels: [..., K] 0/1 on valid frames (int or float).
    valid: [...] bool, frame level.
    thresholds: scalar or [K] per-AU decision thresholds (e.g. from
      ``AUStats.tune_thresholds`` on another set).
    grid: thresholds at which counts for tuning are also kept.
    from_logits: apply a sigmoid to ``scores`` first.
  """
  return _au_stats(scores, labels, valid, jnp.asarray(thresholds, jnp.float32),
                   _as_grid(grid), from_logits)


def _confusion_counts(positive_pred, positive_true, negative_true):
  tp = jnp.sum(positive_pred & positive_true, axis=0, dtype=jnp.int32)
  fp = jnp.sum(positive_pred & negative_true, axis=0, dtype=jnp.int32)
  fn = jnp.sum(~positive_pred & positive_true, axis=0, dtype=jnp.int32)
  return tp, fp, fn


@functools.partial(jax.jit, static_argnames=("grid", "from_logits"))
def _au_stats(scores, labels, valid, thresholds, grid, from_logits):
  if scores.shape != labels.shape:
    raise ValueError(f"au_stats: scores shape {scores.shape} != labels shape {labels.shape}")
  mask = _check_mask(valid, labels.shape[:-1], "au_stats")
  num_aus = scores.shape[-1]
  if thresholds.shape not in ((), (num_aus,)):
    raise ValueError(f"au_stats: thresholds shape {thresholds.shape} is neither scalar nor "
                     f"({num_aus},)")
  probs = scores.reshape(-1, num_aus).astype(jnp.float32)
  if from_logits:
    probs = jax.nn.sigmoid(probs)
  labels = labels.reshape(-1, num_aus)
  positive_true = (labels == 1) & mask[:, None]
  negative_true = (labels == 0) & mask[:, None]
  bad = jnp.any(~(positive_true | negative_true), axis=-1) & mask

  tp, fp, fn = _confusion_counts(probs >= thresholds, positive_true, negative_true)
  grid_array = jnp.asarray(grid, jnp.float32)[:, None, None]
  grid_tp, grid_fp, grid_fn = jax.vmap(_confusion_counts, in_axes=(0, None, None))(
      probs[None] >= grid_array, positive_true, negative_true)
  return AUStats(jnp.sum(mask, dtype=jnp.int32), tp, fp, fn, grid_tp, grid_fp, grid_fn,
                 jnp.sum(bad, dtype=jnp.int32), grid)


# --------------------------------------------------------------------------- generic

Stats = VAStats | ExprStats | AUStats


def empty(task: str, **kwargs) -> Stats:
  """Empty statistics for ``task`` in {"va", "expr", "au"}."""
  types = {"va": VAStats, "expr": ExprStats, "au": AUStats}
  if task not in types:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(types)}")
  return types[task].empty(**kwargs)


def merge(a: Stats, b: Stats) -> Stats:
  """Statistics of the union of two disjoint frame sets (associative)."""
  if type(a) is not type(b):
    raise TypeError(f"cannot merge {type(a).__name__} with {type(b).__name__}")
  return a.merge(b)


def merge_stacked(stacked: Stats) -> Stats:
  """Collapse statistics stacked along a leading axis (e.g. from ``all_gather``)."""
  if isinstance(stacked, VAStats):
    return _merge_stacked_va_jit(stacked)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def compute(stats: Stats) -> dict[str, float]:
  """Scores as python floats (see each type's ``compute``)."""
  return stats.compute()
