"""experiments/bench/memory_summary.py: medians of alternated children and per-round ratios."""

from experiments.bench import memory_summary


def _child(peak, resting, hits=0):
  return {"name": "ours", "peak_mib": peak, "resting_mib": resting, "step_extra_mib": peak - resting,
          "cache_hits": hits, "cache_misses": 0}


def test_median_memory_takes_medians_and_counts_failed_children():
  samples = [_child(1200.0, 1100.0, 4), {"name": "ours", "error": "killed"}, _child(1180.0, 1110.0, 4),
             _child(1190.0, 1090.0, 4)]
  m = memory_summary.median_memory(samples)
  assert m["peak_mib"] == 1190.0
  assert m["resting_mib"] == 1100.0
  assert m["step_extra_mib"] == 100.0  # median of 100, 70, 100
  assert m["failed"] == 1
  assert m["cache_hits"] == [4, 4, 4]
  assert m["samples"] == samples  # every round's child, failed ones included


def test_median_memory_of_failed_children_is_the_error():
  m = memory_summary.median_memory([{"name": "ours", "error": "killed"}, {"name": "ours", "error": "again"}])
  assert m["error"] == "killed" and m["failed"] == 2 and "peak_mib" not in m


def test_memory_ratios_are_taken_round_by_round():
  ours = memory_summary.median_memory([_child(1100.0, 1000.0), _child(1300.0, 1000.0), _child(900.0, 800.0)])
  torch = memory_summary.median_memory([_child(1000.0, 900.0), {"name": "torch", "error": "killed"},
                                 _child(1000.0, 900.0)])
  assert memory_summary.memory_ratios(ours, torch) == [1.1, 0.9]  # round 2 left out, not shifted
  assert memory_summary.memory_ratios(ours, {"error": "x"}) == []
