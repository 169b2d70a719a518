"""Per-frame training losses for the three ABAW tasks, with label-validity masks.

Every loss takes a boolean ``valid`` mask over frames. Invalid frames (label -5 for
VA, -1 for EXPR/AU in Aff-Wild2) contribute nothing: their predictions and labels
are replaced by zeros *before* any arithmetic, so garbage there (even NaN/inf) can
neither change the value nor leak into gradients. A batch with no valid frame gives
loss 0 with all-zero, finite gradients, so a step on such a batch is a no-op for the
loss term instead of a NaN.

All functions are pure, shape-polymorphic over leading axes and safe under
``jax.jit``; they return float32 scalars.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

CCC_EPS = 1e-8


def _as_mask(valid: jax.Array, leading_shape: tuple[int, ...], name: str) -> jax.Array:
  if tuple(valid.shape) != tuple(leading_shape):
    raise ValueError(
        f"{name}: valid mask has shape {tuple(valid.shape)} but the frames have "
        f"shape {tuple(leading_shape)}")
  return valid.astype(bool)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 (with zero gradient) where denominator == 0."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def ccc_loss(pred: jax.Array, target: jax.Array, valid: jax.Array,
             eps: float = CCC_EPS) -> jax.Array:
  """1 - concordance correlation coefficient, per dimension, averaged over dimensions.

  CCC = 2 cov(p, t) / (var(p) + var(t) + (mean(p) - mean(t))^2), population
  (ddof=0) statistics over all valid frames of the batch pooled together, with
  ``eps`` added to the denominator so constant predictions give a finite loss.

  Args:
    pred: [..., D] predictions (D=2 for valence, arousal).
    target: [..., D] labels; values in invalid frames are ignored.
    valid: [...] bool, True where the frame's label is usable.
    eps: denominator guard.

  Returns:
    scalar mean over D of (1 - CCC_d); exactly 0 when no frame is valid.
  """
  if pred.shape != target.shape:
    raise ValueError(f"ccc_loss: pred shape {pred.shape} != target shape {target.shape}")
  mask = _as_mask(valid, pred.shape[:-1], "ccc_loss")
  dims = pred.shape[-1]
  pred = jnp.where(mask[..., None], pred, 0.0).reshape(-1, dims).astype(jnp.float32)
  target = jnp.where(mask[..., None], target, 0.0).reshape(-1, dims).astype(jnp.float32)
  weight = mask.reshape(-1, 1).astype(jnp.float32)

  count = jnp.sum(weight)
  inv_count = _safe_divide(1.0, count)
  mean_pred = jnp.sum(pred, axis=0) * inv_count
  mean_target = jnp.sum(target, axis=0) * inv_count
  centred_pred = (pred - mean_pred) * weight
  centred_target = (target - mean_target) * weight
  var_pred = jnp.sum(centred_pred**2, axis=0) * inv_count
  var_target = jnp.sum(centred_target**2, axis=0) * inv_count
  covariance = jnp.sum(centred_pred * centred_target, axis=0) * inv_count
  ccc = 2.0 * covariance / (var_pred + var_target + (mean_pred - mean_target)**2 + eps)
  return jnp.where(count > 0, jnp.mean(1.0 - ccc), 0.0)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array,
                       class_weights: Optional[jax.Array] = None,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Class-weighted, optionally label-smoothed softmax cross-entropy over valid frames.

  Matches ``torch.nn.CrossEntropyLoss(weight=class_weights,
  label_smoothing=label_smoothing)`` with mean reduction, computed over valid frames
  only: ``sum_i w_{y_i} l_i / sum_i w_{y_i}``. With smoothing, torch's convention is
  kept: ``(1-s) * NLL + (s/C) * sum_i sum_c w_c (-log p_ic) / sum_i w_{y_i}``.

  Args:
    logits: [..., C] unnormalised scores.
    labels: [...] int class indices in [0, C) for valid frames; anything (e.g. -1)
      for invalid frames.
    valid: [...] bool.
    class_weights: optional [C] non-negative weights.
    label_smoothing: in [0, 1].

  Returns:
    scalar; 0 when no valid frame (or all valid frames have zero class weight).
  """
  mask = _as_mask(valid, logits.shape[:-1], "cross_entropy_loss")
  if labels.shape != mask.shape:
    raise ValueError(f"cross_entropy_loss: labels shape {labels.shape} != frames "
                     f"shape {mask.shape}")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"cross_entropy_loss: label_smoothing={label_smoothing} not in [0, 1]")
  num_classes = logits.shape[-1]
  logits = jnp.where(mask[..., None], logits, 0.0).astype(jnp.float32)
  labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  if class_weights is None:
    class_weights = jnp.ones((num_classes,), jnp.float32)
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"cross_entropy_loss: class_weights shape {class_weights.shape} "
                     f"!= ({num_classes},)")

  log_probs = jax.nn.log_softmax(logits, axis=-1)
  frame_weight = class_weights[labels] * mask
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  total_weight = jnp.sum(frame_weight)
  loss = _safe_divide(jnp.sum(frame_weight * nll), total_weight)
  if label_smoothing:
    smooth = -jnp.sum(log_probs * class_weights, axis=-1) * mask
    smooth_loss = _safe_divide(jnp.sum(smooth), total_weight)
    loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth_loss
  return loss


def bce_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array,
             pos_weight: Optional[jax.Array] = None) -> jax.Array:
  """Multi-label sigmoid binary cross-entropy averaged over valid frames x labels.

  Matches ``torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)`` (mean reduction)
  restricted to valid frames:
  ``l = -[pos_weight * y * log sigmoid(x) + (1 - y) * log sigmoid(-x)]``, using
  ``jax.nn.log_sigmoid`` so large |logits| stay finite.

  Args:
    logits: [..., K].
    targets: [..., K] in [0, 1] for valid frames.
    valid: [...] bool, frame level (an AU frame with any -1 label is invalid).
    pos_weight: optional [K] weight of the positive term per label.

  Returns:
    scalar; 0 when no frame is valid.
  """
  if logits.shape != targets.shape:
    raise ValueError(f"bce_loss: logits shape {logits.shape} != targets shape "
                     f"{targets.shape}")
  mask = _as_mask(valid, logits.shape[:-1], "bce_loss")
  num_labels = logits.shape[-1]
  logits = jnp.where(mask[..., None], logits, 0.0).astype(jnp.float32)
  targets = jnp.where(mask[..., None], targets, 0.0).astype(jnp.float32)
  if pos_weight is None:
    pos_weight = jnp.ones((num_labels,), jnp.float32)
  pos_weight = jnp.asarray(pos_weight, jnp.float32)
  if pos_weight.shape != (num_labels,):
    raise ValueError(f"bce_loss: pos_weight shape {pos_weight.shape} != ({num_labels},)")
  per_element = -(pos_weight * targets * jax.nn.log_sigmoid(logits)
                  + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  per_element = per_element * mask[..., None]
  return _safe_divide(jnp.sum(per_element), jnp.sum(mask) * float(num_labels))
