"""Streamed, merged metric statistics vs numpy float64 / sklearn on the full set."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from affect_jax import metrics


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def _batch_bounds(num_frames, rng, sizes=(1, 2, 7, 64, 333)):
  """Split [0, num_frames) into batches of mixed sizes, always including size 1."""
  bounds, start = [], 0
  while start < num_frames:
    size = int(rng.choice(sizes)) if bounds else 1
    bounds.append((start, min(start + size, num_frames)))
    start += size
  return bounds


def _stream(stats_fn, arrays, valid, bounds, empty):
  total = empty
  for start, stop in bounds:
    total = metrics.merge(total, stats_fn(*(a[start:stop] for a in arrays), valid[start:stop]))
  return total


def _numpy_ccc(pred, target):
  pred, target = pred.astype(np.float64), target.astype(np.float64)
  mean_p, mean_t = pred.mean(0), target.mean(0)
  cov = ((pred - mean_p) * (target - mean_t)).mean(0)
  return 2 * cov / (pred.var(0) + target.var(0) + (mean_p - mean_t)**2)


def _va_set(rng, num_frames, offset=0.0, scale=0.4):
  target = (offset + scale * rng.standard_normal((num_frames, 2))).astype(np.float32)
  pred = (offset - 0.05 + 0.6 * (target - offset)
          + 0.5 * scale * rng.standard_normal((num_frames, 2))).astype(np.float32)
  return pred, target


def _invalidate(valid, start, stop):
  valid = valid.copy()
  valid[start:stop] = False
  return valid


# ------------------------------------------------------------------------------- VA


def test_va_streamed_batches_match_numpy_ccc(rng):
  pred, target = _va_set(rng, 3000)
  valid = rng.random(3000) > 0.2
  bounds = _batch_bounds(3000, rng)
  valid = _invalidate(valid, *bounds[3])  # one batch with no valid frame
  target[~valid] = -5.0  # Aff-Wild2's invalid marker must not leak into the score

  result = metrics.compute(_stream(metrics.va_stats, (pred, target), valid, bounds,
                                   metrics.empty("va")))
  expected = _numpy_ccc(pred[valid], target[valid])
  assert result["num_frames"] == valid.sum()
  np.testing.assert_allclose([result["ccc_valence"], result["ccc_arousal"]], expected,
                             atol=1e-6)
  assert result["p_va"] == pytest.approx(expected.mean(), abs=1e-6)


@pytest.mark.parametrize("batch_size", [7, 100, 1000, 100_000])
def test_va_large_offset_set_keeps_float64_agreement(rng, batch_size):
  # Means at 0.7 with spread 0.1: raw float32 sums of squares lose ~1e-5 here, and an
  # uncompensated float32 Chan merge drifts to ~1e-6 over these streams; the
  # compensated merge stays below ~1e-8, hence the 1e-7 tolerance.
  pred, target = _va_set(rng, 100_000, offset=0.7, scale=0.1)
  valid = np.ones(100_000, bool)
  if batch_size == 7:  # 14k merges would take long; stream a 7-frame-batch prefix
    pred, target, valid = pred[:14_000], target[:14_000], valid[:14_000]
  bounds = [(s, s + batch_size) for s in range(0, len(valid), batch_size)]
  result = _stream(metrics.va_stats, (pred, target), valid, bounds, metrics.empty("va"))
  result = result.compute()
  np.testing.assert_allclose([result["ccc_valence"], result["ccc_arousal"]],
                             _numpy_ccc(pred, target), atol=1e-7)


def test_va_constant_and_degenerate_cases(rng):
  target = rng.uniform(-1, 1, (50, 2)).astype(np.float32)
  valid = np.ones(50, bool)
  constant = metrics.va_stats(np.full_like(target, 0.2), target, valid).compute()
  assert constant["ccc_valence"] == pytest.approx(0.0, abs=1e-7)
  assert constant["ccc_arousal"] == pytest.approx(0.0, abs=1e-7)
  assert np.isfinite(constant["p_va"])

  both_equal = metrics.va_stats(np.full_like(target, 0.2), np.full_like(target, 0.2), valid)
  assert both_equal.compute()["p_va"] == 0.0  # 0/0: reported as 0 by definition
  both_different = metrics.va_stats(np.full_like(target, 0.2), np.full_like(target, 0.5),
                                    valid)
  assert both_different.compute()["p_va"] == 0.0

  single = metrics.va_stats(target[:1], target[:1] + 0.1, valid[:1]).compute()
  assert single["p_va"] == 0.0 and single["num_frames"] == 1

  assert np.isnan(metrics.empty("va").compute()["p_va"])
  assert np.isnan(metrics.va_stats(target, target, ~valid).compute()["p_va"])


def test_va_merge_is_associative_and_stack_and_all_reduce_agree(rng):
  pred, target = _va_set(rng, 300, offset=0.3)
  valid = rng.random(300) > 0.1
  parts = [metrics.va_stats(pred[s:s + 60], target[s:s + 60], valid[s:s + 60])
           for s in range(0, 300, 60)]
  left = metrics.merge(metrics.merge(parts[0], parts[1]), parts[2])
  right = metrics.merge(parts[0], metrics.merge(parts[1], parts[2]))
  np.testing.assert_allclose(left.compute()["p_va"], right.compute()["p_va"], atol=1e-7)

  expected = _numpy_ccc(pred[valid], target[valid]).mean()
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
  assert metrics.merge_stacked(stacked).compute()["p_va"] == pytest.approx(expected,
                                                                            abs=1e-6)
  # The collective path (vmap stands in for devices along a named axis).
  reduced = jax.vmap(lambda s: s.all_reduce("devices"), axis_name="devices")(stacked)
  for device in range(len(parts)):
    one = jax.tree.map(lambda x: x[device], reduced)
    assert one.compute()["p_va"] == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- EXPR


def _expr_set(rng, num_frames, absent=(6,), never_seen=(7,)):
  """Labels without the classes in `absent`; predictions may hit them (false positives),
  and never hit `never_seen`, which is also absent from the labels."""
  labels = rng.choice([c for c in range(8) if c not in absent + never_seen], num_frames)
  noisy = rng.integers(0, 7, num_frames)  # never predicts class 7
  pred = np.where(rng.random(num_frames) < 0.6, labels, noisy)
  logits = rng.standard_normal((num_frames, 8)).astype(np.float32)
  logits[np.arange(num_frames), pred] += 10.0
  return logits, pred, labels


def test_expr_streamed_macro_f1_matches_sklearn_over_all_8_classes(rng):
  logits, pred, labels = _expr_set(rng, 2000)
  valid = rng.random(2000) > 0.2
  bounds = _batch_bounds(2000, rng)
  valid = _invalidate(valid, *bounds[2])
  labels[~valid] = -1

  stats = _stream(metrics.expr_stats, (logits, labels), valid, bounds, metrics.empty("expr"))
  result = stats.compute()
  expected_f1 = f1_score(labels[valid], pred[valid], labels=range(8), average="macro",
                         zero_division=0)
  assert result["expr_f1"] == pytest.approx(expected_f1, abs=1e-12)
  assert result["expr_accuracy"] == pytest.approx(
      accuracy_score(labels[valid], pred[valid]), abs=1e-12)
  assert result["expr_f1_Surprise"] == 0.0 and result["expr_f1_Other"] == 0.0
  # Without labels=, sklearn averages over the 7 classes seen in truth or prediction;
  # the challenge divides by all 8.
  seen = f1_score(labels[valid], pred[valid], average="macro", zero_division=0)
  assert result["expr_f1"] == pytest.approx(seen * 7 / 8, abs=1e-12)
  assert result["num_frames"] == valid.sum()
  np.testing.assert_array_equal(
      np.asarray(stats.confusion),
      np.histogram2d(labels[valid], pred[valid], bins=np.arange(9))[0].astype(int))

  # Class indices (e.g. after the test-time mode filter) give the same statistics.
  by_index = metrics.expr_stats(pred.astype(np.int32), labels, valid)
  np.testing.assert_array_equal(np.asarray(by_index.confusion), np.asarray(stats.confusion))


def test_expr_rejects_out_of_range_labels_on_valid_frames():
  logits = np.eye(8, dtype=np.float32)[[0, 1, 2]]
  stats = metrics.expr_stats(logits, np.array([0, 8, -1]), np.array([True, True, False]))
  with pytest.raises(ValueError, match="1 frame"):
    stats.compute()
  with pytest.raises(ValueError, match="integer class indices"):
    metrics.expr_stats(np.zeros(3, np.float32), np.zeros(3, np.int32), np.ones(3, bool))


def test_expr_empty_is_nan():
  result = metrics.empty("expr").compute()
  assert np.isnan(result["expr_f1"]) and np.isnan(result["expr_accuracy"])


# ------------------------------------------------------------------------------- AU


def _au_set(rng, num_frames):
  labels = (rng.random((num_frames, 12)) < rng.uniform(0.05, 0.5, 12)).astype(np.int32)
  logits = (2.0 * labels - 1.0 + 1.5 * rng.standard_normal((num_frames, 12)))
  labels[:, 11] = 0  # an AU never active: F1 is 0 by zero_division=0 or by false positives
  return logits.astype(np.float32), labels


def _sklearn_au_f1(probs, labels, thresholds):
  return np.array([f1_score(labels[:, k], (probs[:, k] >= thresholds[k]).astype(int),
                            zero_division=0) for k in range(labels.shape[1])])


def test_au_streamed_f1_matches_sklearn_at_half_and_on_grid(rng):
  logits, labels = _au_set(rng, 1500)
  valid = rng.random(1500) > 0.2
  bounds = _batch_bounds(1500, rng)
  valid = _invalidate(valid, *bounds[4])
  labels[~valid] = -1

  stats = _stream(metrics.au_stats, (logits, labels), valid, bounds, metrics.empty("au"))
  probs = 1.0 / (1.0 + np.exp(-logits[valid].astype(np.float64)))
  truth = labels[valid]
  expected = _sklearn_au_f1(probs, truth, np.full(12, 0.5))
  result = stats.compute()
  assert result["au_f1"] == pytest.approx(expected.mean(), abs=1e-12)
  assert result["num_frames"] == valid.sum()
  np.testing.assert_allclose([result[f"au_f1_{n}"] for n in metrics.AU_NAMES], expected,
                             atol=1e-12)

  for index, threshold in enumerate(metrics.THRESHOLD_GRID):
    grid_f1 = 2 * stats.grid_tp[index] / np.maximum(
        2 * stats.grid_tp[index] + stats.grid_fp[index] + stats.grid_fn[index], 1)
    np.testing.assert_allclose(grid_f1, _sklearn_au_f1(probs, truth, np.full(12, threshold)),
                               atol=1e-12)

  thresholds, best_f1, mean_f1 = stats.tune_thresholds()
  assert mean_f1 >= result["au_f1"]
  np.testing.assert_allclose(best_f1, _sklearn_au_f1(probs, truth, thresholds), atol=1e-12)


def test_au_threshold_tuning_finds_the_constructed_best_threshold_per_au(rng):
  """AU k's positives score just above t_k and negatives just below: only t_k is perfect."""
  best = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.3, 0.6, 0.2])
  labels = (rng.random((400, 12)) < 0.3).astype(np.int32)
  probs = np.where(labels == 1, best + 0.04, best - 0.04).astype(np.float32)
  stats = metrics.au_stats(probs, labels, np.ones(400, bool), from_logits=False)

  thresholds, best_f1, mean_f1 = stats.tune_thresholds()
  np.testing.assert_allclose(thresholds, best)
  np.testing.assert_array_equal(best_f1, np.ones(12))
  assert mean_f1 == 1.0
  assert stats.compute()["au_f1"] < 1.0  # 0.5 is wrong for most of them

  # Tuned thresholds carried to another set drawn the same way.
  other_labels = (rng.random((200, 12)) < 0.3).astype(np.int32)
  other_probs = np.where(other_labels == 1, best + 0.04, best - 0.04).astype(np.float32)
  applied = metrics.au_stats(other_probs, other_labels, np.ones(200, bool),
                             thresholds=thresholds, from_logits=False)
  assert applied.compute()["au_f1"] == 1.0


def test_au_threshold_ties_go_to_lowest_and_bad_labels_raise():
  labels = np.zeros((5, 12), np.int32)
  stats = metrics.au_stats(np.zeros((5, 12), np.float32) + 0.01, labels, np.ones(5, bool),
                           from_logits=False)
  thresholds, best_f1, _ = stats.tune_thresholds()  # no positives anywhere: all F1 = 0
  np.testing.assert_array_equal(best_f1, np.zeros(12))
  np.testing.assert_allclose(thresholds, np.full(12, 0.1))

  labels[2, 3] = -1
  bad = metrics.au_stats(np.zeros((5, 12), np.float32), labels, np.ones(5, bool))
  with pytest.raises(ValueError, match="AU metrics: 1 frame"):
    bad.compute()
  with pytest.raises(ValueError, match="threshold grids differ"):
    metrics.merge(metrics.empty("au"), metrics.empty("au", grid=(0.25, 0.5)))


# ------------------------------------------------------------------- across devices

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from affect_jax import metrics
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(1)
    va_pred = rng.standard_normal((64, 2)).astype(np.float32) + 0.7
    va_target = (0.5 * va_pred + rng.standard_normal((64, 2))).astype(np.float32)
    expr_logits = rng.standard_normal((64, 8)).astype(np.float32)
    expr_labels = rng.integers(0, 8, 64)
    au_logits = rng.standard_normal((64, 12)).astype(np.float32)
    au_labels = rng.integers(0, 2, (64, 12))
    valid = rng.random(64) > 0.3

    def per_device(vp, vt, el, ey, al, ay, v):
      return (metrics.va_stats(vp, vt, v).all_reduce("data"),
              metrics.expr_stats(el, ey, v).all_reduce("data"),
              metrics.au_stats(al, ay, v).all_reduce("data"))

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                    out_specs=P(), check_vma=False))(
        va_pred, va_target, expr_logits, expr_labels, au_logits, au_labels, valid)
    reference = (metrics.va_stats(va_pred, va_target, valid),
                 metrics.expr_stats(expr_logits, expr_labels, valid),
                 metrics.au_stats(au_logits, au_labels, valid))
    # A global batch sharded over devices needs no collective: XLA reduces it.
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    put = lambda x: jax.device_put(x, sharding)
    global_va = metrics.va_stats(put(va_pred), put(va_target), put(valid))
    assert abs(global_va.compute()["p_va"] - reference[0].compute()["p_va"]) < 1e-6
    for got, want in zip(sharded, reference):
      got, want = got.compute(), want.compute()
      assert got.keys() == want.keys()
      for key in want:
        assert abs(got[key] - want[key]) < 1e-6, (key, got[key], want[key])
    print("OK")
""")


def test_all_reduce_under_shard_map_on_four_fake_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
