"""JAX's persistent compilation cache, on by default in a directory kept per machine and jaxlib.

A stage compiles its programs again in every process: each restart, resume, fold and `predict`
pays the compilation and keeps the compiler's code and leftovers in its resident memory. With the
cache, a process after the first loads the compiled programs instead. On the 2-core VM (AMD EPYC)
the default main job's second run took 3 min 35 s instead of 3 min 55 s and peaked at 1.30 GiB
instead of 1.45 GiB, with the same results; the tiny MAE step's process peaked at 1186-1196 MiB
with its programs from the cache against 1214-1227 MiB when it compiled them
(`python -m experiments.bench.mae_step`, its memory child; experiments/bench/RESULTS.md, where
the cost is also measured: a loaded ViT-B/16 MAE step's call adds +616 MiB against a compiled
one's +565, medians of three processes each).

The executables are machine code for the CPU that compiled them, and JAX's cache key on CPU names
neither the CPU's features nor the jaxlib build, so the directory does:
`$XDG_CACHE_HOME/affect_jax/xla-<machine>-jaxlib<version>-<hash of the CPU model and flags>`
(`~/.cache` when XDG_CACHE_HOME is unset), created private to the user (JAX runs what it finds
there). Nothing is changed when the user has chosen: JAX_COMPILATION_CACHE_DIR (or
`jax_compilation_cache_dir`) set wins, and JAX_ENABLE_COMPILATION_CACHE=false turns it off.
Every program is stored, also those that compile in under a second (JAX's default threshold,
kept when JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is set): one compilation in a process is enough
to page in the compiler, so the tiny step's process with only the step from the cache peaked at
1204 MiB, with every program from it at 1195 in the same benchmark (PyTorch's 1195).

`affect_jax.main`, `affect_jax.predict` and the benchmarks call `enable()` before compiling.
"""

import hashlib
import os
import platform

from absl import logging
import jax
import jaxlib


_CPU_FIELDS = ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")


def machine_tag(cpuinfo=None):
  """`<machine>-jaxlib<version>-<12 hex digits>`: what a compiled CPU program depends on.

  The digits hash the first core's model and feature flags in `cpuinfo` (the text of
  /proc/cpuinfo, read when None; empty where there is none).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  described, seen = [platform.machine()], set()
  for line in cpuinfo.splitlines():
    key = line.split(":", 1)[0].strip()
    if key in _CPU_FIELDS and key not in seen:
      seen.add(key)
      described.append(" ".join(line.split()))
  digest = hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]
  return f"{platform.machine()}-jaxlib{jaxlib.__version__}-{digest}"


def default_dir():
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "affect_jax", "xla-" + machine_tag())


def enable():
  """Points JAX's persistent compilation cache at `default_dir()` unless the user chose.

  Returns the directory in use, or None when the cache is off (disabled by the user, or the
  directory cannot be made: then a warning, and every process compiles as before).
  """
  if not jax.config.jax_enable_compilation_cache:
    return None
  chosen = jax.config.jax_compilation_cache_dir
  if chosen:
    return chosen
  path = default_dir()
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
  except OSError as e:
    logging.warning("JAX compilation cache off: cannot make %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  logging.info("JAX compilation cache: %s (affect_jax.compilation_cache)", path)
  return path
