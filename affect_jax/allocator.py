"""The process's C allocator: at most two glibc malloc arenas, set by the entry points.

glibc's malloc gives each thread that allocates an arena of its own, up to 8 per core, and memory
freed in an arena stays with that arena until the top of its heap is free. The data pipelines'
reader threads (8 by default) decode frames and assemble batches, each in whichever arena it got,
so the process's resident memory kept rising with the work done rather than settling: the extract
stage's peak RSS over 1.6 k / 5.9 k / 25.5 k synthetic frames was 1122 / 1209 / 1277-1303 MiB with
glibc's default and 1057-1081 / 1094-1115 / 1113-1127 MiB with two arenas (each size in its own
process, 2-3 runs each; `python -m experiments.bench.growth`, experiments/bench/RESULTS.md). Its
time and the MAE image pipeline's rate were unchanged within the runs' spread (images/s, 0
workers, alternated processes: 522-572 with the default, 570-673 with two arenas).

`affect_jax.main` and `affect_jax.predict` call `limit_arenas()` first thing, before any thread
of ours starts. A user's own MALLOC_ARENA_MAX wins; on another C library nothing changes.
"""

import ctypes
import os

from absl import logging

ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def glibc():
  """The process's C library through ctypes when it is glibc, else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return None
  return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
  """Caps this process's glibc malloc arenas at `arenas`; True if it did.

  Arenas made before the call stay; threads that allocate afterwards share the capped set.
  Nothing is changed when MALLOC_ARENA_MAX is set in the environment (the user's choice) or when
  the C library is not glibc.
  """
  libc = glibc()
  if "MALLOC_ARENA_MAX" in os.environ or libc is None:
    return False
  done = bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))
  if done:
    logging.info("glibc malloc arenas capped at %d (affect_jax.allocator)", arenas)
  return done
