"""Peak-memory children of a figure summarised: medians over the alternated rounds and per-round
ratios. Kept apart from `harness`, whose import sets up the process for a figure (malloc arenas,
the compilation cache, OpenMP's wait policy), so that tests can import these without it.
"""

import numpy as np


def median_memory(samples):
  """One contender's memory children (`measure_memory` answers) as medians, with every sample.

  Children that failed are counted in `failed`; with none measured, the first error is returned.
  """
  ok = [m for m in samples if "peak_mib" in m]
  if not ok:
    return dict(samples[0], failed=len(samples))
  out = {"name": ok[0]["name"], "failed": len(samples) - len(ok), "samples": list(samples)}
  for key in ("peak_mib", "resting_mib", "step_extra_mib"):
    out[key] = float(np.median([m[key] for m in ok]))
  for key in ("cache_hits", "cache_misses"):
    out[key] = [m[key] for m in ok]
  return out


def memory_ratios(ours, other):
  """Per-round ratios of peak RSS ours / other, from two `median_memory` answers (rounds where
  either child failed are left out)."""
  if "samples" not in ours or "samples" not in other:
    return []
  return [a["peak_mib"] / b["peak_mib"] for a, b in zip(ours["samples"], other["samples"])
          if "peak_mib" in a and "peak_mib" in b]
