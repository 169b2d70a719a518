"""Losses vs numpy / torch references, with validity masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import losses


def _numpy_ccc(pred, target):
  pred, target = pred.astype(np.float64), target.astype(np.float64)
  mean_p, mean_t = pred.mean(0), target.mean(0)
  cov = ((pred - mean_p) * (target - mean_t)).mean(0)
  return 2 * cov / (pred.var(0) + target.var(0) + (mean_p - mean_t)**2)


def _with_garbage(x, valid, value):
  x = np.array(x, copy=True)
  x[~valid] = value
  return x


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------- CCC


def test_ccc_loss_matches_numpy_on_valid_frames_only(rng):
  target = rng.uniform(-1, 1, (4, 30, 2)).astype(np.float32)
  pred = (0.6 * target + 0.3 * rng.standard_normal((4, 30, 2)) + 0.1).astype(np.float32)
  valid = rng.random((4, 30)) > 0.3
  expected = np.mean(1 - _numpy_ccc(pred[valid], target[valid]))

  loss = jax.jit(losses.ccc_loss)(pred, target, valid)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

  # Aff-Wild2 marks invalid VA frames with -5; NaN/inf predictions there must not leak.
  garbage = jax.jit(losses.ccc_loss)(_with_garbage(pred, valid, np.nan),
                                     _with_garbage(target, valid, -5.0), valid)
  np.testing.assert_allclose(float(garbage), float(loss), rtol=1e-6)
  grads = jax.grad(losses.ccc_loss)(_with_garbage(pred, valid, np.inf),
                                    _with_garbage(target, valid, -5.0), valid)
  assert np.all(np.isfinite(grads))
  assert np.all(np.asarray(grads)[~valid] == 0)
  assert np.any(np.asarray(grads)[valid] != 0)


def test_ccc_loss_known_values(rng):
  target = rng.uniform(-1, 1, (50, 2)).astype(np.float32)
  valid = np.ones(50, bool)
  assert float(losses.ccc_loss(target, target, valid)) == pytest.approx(0.0, abs=1e-6)
  centred = target - target.mean(0)
  assert float(losses.ccc_loss(-centred, centred, valid)) == pytest.approx(2.0, abs=1e-5)
  constant = np.full_like(target, 0.3)
  assert float(losses.ccc_loss(constant, target, valid)) == pytest.approx(1.0, abs=1e-6)


def test_ccc_loss_all_invalid_is_zero_with_zero_finite_gradients(rng):
  pred = rng.standard_normal((3, 8, 2)).astype(np.float32)
  target = np.full((3, 8, 2), -5.0, np.float32)
  valid = np.zeros((3, 8), bool)
  loss, grads = jax.jit(jax.value_and_grad(losses.ccc_loss))(pred, target, valid)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grads) == 0)


def test_ccc_loss_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="valid mask has shape"):
    losses.ccc_loss(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.ones((5,), bool))


# ----------------------------------------------------------------------- cross-entropy


def _numpy_weighted_ce(logits, labels, weights):
  logits = logits.astype(np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -log_probs[np.arange(len(labels)), labels]
  return np.sum(weights[labels] * nll) / np.sum(weights[labels])


def test_cross_entropy_matches_numpy_weighted_mean(rng):
  logits = rng.standard_normal((5, 20, 8)).astype(np.float32) * 3
  labels = rng.integers(0, 8, (5, 20))
  valid = rng.random((5, 20)) > 0.25
  weights = rng.uniform(0.2, 3.0, 8).astype(np.float32)
  expected = _numpy_weighted_ce(logits[valid], labels[valid], weights)

  loss = jax.jit(losses.cross_entropy_loss)(logits, labels, valid, weights)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  garbage = losses.cross_entropy_loss(_with_garbage(logits, valid, np.nan),
                                      _with_garbage(labels, valid, -1), valid, weights)
  np.testing.assert_allclose(float(garbage), float(loss), rtol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(rng, label_smoothing):
  torch = pytest.importorskip("torch")
  logits = rng.standard_normal((6, 16, 8)).astype(np.float32) * 2
  labels = rng.integers(0, 8, (6, 16))
  valid = rng.random((6, 16)) > 0.3
  weights = rng.uniform(0.2, 3.0, 8).astype(np.float32)
  criterion = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weights),
                                        label_smoothing=label_smoothing)
  expected = criterion(torch.from_numpy(logits[valid]), torch.from_numpy(labels[valid]))

  loss = losses.cross_entropy_loss(logits, _with_garbage(labels, valid, -1), valid, weights,
                                   label_smoothing=label_smoothing)
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)

  unweighted = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(
      torch.from_numpy(logits[valid]), torch.from_numpy(labels[valid]))
  np.testing.assert_allclose(
      float(losses.cross_entropy_loss(logits, labels, valid,
                                      label_smoothing=label_smoothing)),
      unweighted.item(), rtol=1e-5)


def test_cross_entropy_all_invalid_is_zero_with_zero_finite_gradients(rng):
  logits = rng.standard_normal((2, 5, 8)).astype(np.float32)
  labels = np.full((2, 5), -1)
  valid = np.zeros((2, 5), bool)
  loss, grads = jax.value_and_grad(losses.cross_entropy_loss)(
      logits, labels, valid, jnp.ones(8), 0.1)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grads) == 0)


# ------------------------------------------------------------------------------ BCE


def _numpy_bce(logits, targets, pos_weight):
  logits = logits.astype(np.float64)
  log_sig = -np.logaddexp(0, -logits)
  log_one_minus = -np.logaddexp(0, logits)
  return np.mean(-(pos_weight * targets * log_sig + (1 - targets) * log_one_minus))


def test_bce_matches_numpy_and_torch(rng):
  logits = (rng.standard_normal((4, 25, 12)) * 4).astype(np.float32)
  targets = (rng.random((4, 25, 12)) > 0.7).astype(np.float32)
  valid = rng.random((4, 25)) > 0.3
  pos_weight = rng.uniform(0.5, 5.0, 12).astype(np.float32)

  loss = jax.jit(losses.bce_loss)(logits, targets, valid, pos_weight)
  np.testing.assert_allclose(float(loss), _numpy_bce(logits[valid], targets[valid],
                                                     pos_weight), rtol=1e-5)
  garbage = losses.bce_loss(_with_garbage(logits, valid, np.nan),
                            _with_garbage(targets, valid, -1.0), valid, pos_weight)
  np.testing.assert_allclose(float(garbage), float(loss), rtol=1e-6)

  torch = pytest.importorskip("torch")
  expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight))(
      torch.from_numpy(logits[valid]), torch.from_numpy(targets[valid]))
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)


def test_bce_is_stable_for_extreme_logits():
  logits = np.array([[100.0, -100.0, 100.0, -100.0]], np.float32)
  targets = np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)
  loss, grads = jax.value_and_grad(losses.bce_loss)(logits, targets, np.ones(1, bool))
  # Two confidently wrong entries cost 100 each, two right ones ~0.
  assert float(loss) == pytest.approx(200.0 / 4, rel=1e-6)
  assert np.all(np.isfinite(grads))


def test_bce_all_invalid_is_zero_with_zero_finite_gradients(rng):
  logits = rng.standard_normal((3, 12)).astype(np.float32)
  targets = np.full((3, 12), -1.0, np.float32)
  loss, grads = jax.value_and_grad(losses.bce_loss)(logits, targets, np.zeros(3, bool),
                                                    jnp.full(12, 2.0))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grads) == 0)
