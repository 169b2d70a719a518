"""The one timing routine every benchmark figure uses: contenders alternated in one process.

A figure is a list of `Contender`s; contender 0 is ours (jitted JAX through the package), the
others what users would otherwise run (PyTorch eager, torch.compile) or a machine limit. `compare`
builds every contender, warms each up (compilation, allocator), then times R rounds alternating the
contenders A B C A B C ... so that the other jobs sharing this machine slow all of them alike; each
timed call starts after --settle seconds idle, so no contender runs while the previous one's
threads are still spinning. It reports medians and, for each contender, the median of the
per-round ratios ours / it (a ratio is taken within one round, so load that changes between rounds
cancels). Contenders with the same
unit compare by items/s; otherwise by GFLOP/s.

Peak memory: with `--memory` each contender marked `memory=True` also runs alone in a subprocess
(`--child=NAME`): built, warmed up (compiled), then the kernel's peak-RSS mark is reset
(/proc/self/clear_refs) and one more call is made; the peak RSS (VmHWM) of that call is the
step's peak, including parameters, optimiser state and the library's own footprint. Both
contenders' children import the same libraries. Every process here turns on JAX's persistent
compilation cache as the package's entry points do (affect_jax/compilation_cache.py), so our child
loads the step the parent compiled, as every run of a config after the first does; ours is then
measured once more with the cache off, compiling everything itself (a first run). The children
are alternated like the timed calls: --memory_rounds rounds of (ours, the others, ours with the
cache off), each child a fresh process; the figure reports each one's median and, for each other
contender, the median of the per-round ratios ours / it (one peak varies by tens of MiB from
process to process on this machine).

Each figure appends a markdown section to experiments/bench/RESULTS.md (date, jax/torch
versions, CPU model, cores, load, XLA_FLAGS, PRNG implementation, the exact command) and writes a
JSON summary to --summary_dir for `matmul_peak` and `run_all`.
"""

import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

# PyTorch's OpenMP threads spin-wait by default; on this shared 2-core machine a descheduled
# thread then stalls every barrier (a tiny MAE step took 0.4-2 s instead of 0.055 s). Passive
# waiting is the fair setting for the PyTorch side here. Read when libgomp starts: before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import flags
import jax
import numpy as np

from affect_jax import allocator
from affect_jax import compilation_cache
from experiments.bench.memory_summary import median_memory, memory_ratios

# Every figure's process (children included) runs with the allocator setting the package's entry
# points make (affect_jax.main, affect_jax.predict): glibc malloc arenas capped.
allocator.limit_arenas()
# ... and with the compilation cache they turn on (affect_jax/compilation_cache.py): the parent's
# warm-up compiles each step and stores it, so a memory child loads it as a second run would.
compilation_cache.enable()

QUICK = flags.DEFINE_bool("quick", False, "Few rounds at small sizes: a sanity run, not a figure.")
ROUNDS = flags.DEFINE_integer("rounds", None, "Timed rounds (default: the figure's; --quick: 2).")
WARMUP = flags.DEFINE_integer("warmup", None, "Untimed calls per contender first (default 2; --quick 1).")
SETTLE = flags.DEFINE_float(
    "settle", 0.3, "Seconds idle before each timed call, so that the previous contender's worker "
    "threads have gone to sleep (numpy's OpenBLAS threads spin after a call: a jnp.dot 2048^2 "
    "right after a numpy matmul ran at 171 GFLOP/s, after 0.2 s idle at 235).")
MEMORY = flags.DEFINE_bool("memory", True, "Also measure each training step's peak RSS in subprocesses.")
CHILD = flags.DEFINE_string("child", None, "Internal: run only this contender and print its peak memory.")
MEMORY_ROUNDS = flags.DEFINE_integer(
    "memory_rounds", 3, "Rounds of memory children, alternated like the timed calls: each round "
    "starts one child per memory contender, then ours with the compilation cache off "
    "(default 3; --quick 1).")
RESULTS_FILE = flags.DEFINE_string(
    "results_file", os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
    "Markdown file each figure appends to ('' = print only).")
SUMMARY_DIR = flags.DEFINE_string("summary_dir", "/tmp/affect_jax_bench",
                                  "Folder for the JSON summary of each figure (read by matmul_peak).")

MIB = 2**20


@dataclasses.dataclass
class Contender:
  """One side of a comparison.

  make: builds the model and inputs; returns `call()` that does one unit of work and blocks until
    it is done (jax.block_until_ready / torch ops are synchronous on CPU).
  items: work items per call (images, segments, ...), in `unit`.
  gflop: floating-point work per call in GFLOP, when known (for GFLOP/s and fractions of peak);
    a callable is asked once every contender is built.
  memory: measure this contender's peak RSS in its own subprocess.
  """
  name: str
  make: Callable[[], Callable[[], Any]]
  items: float
  unit: str
  gflop: float | None = None
  memory: bool = False


def settings(default_rounds, default_warmup=2):
  """(rounds, warmup) from the flags, the figure's defaults and --quick."""
  rounds = ROUNDS.value or (2 if QUICK.value else default_rounds)
  warmup = WARMUP.value if WARMUP.value is not None else (1 if QUICK.value else default_warmup)
  return rounds, warmup


def torch_threads():
  """PyTorch on the same cores JAX uses (JAX's CPU client takes every core)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 2)
  return torch


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions():
  out = {"jax": jax.__version__, "python": platform.python_version()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    out["torch"] = torch.__version__
  except ImportError:
    pass
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    out["transformers"] = transformers.__version__
  except ImportError:
    pass
  return out


def command():
  """The command that reproduces this figure (child/summary flags left out)."""
  module = sys.modules["__main__"].__spec__
  name = module.name if module is not None else sys.argv[0]
  args = [a for a in sys.argv[1:] if not a.startswith(("--child", "--summary_dir"))]
  return "python -m " + " ".join([name] + [shlex.quote(a) for a in args])


def machine_line():
  v = versions()
  return (f"{cpu_model()}, {os.cpu_count()} cores; jax {v['jax']}, torch {v.get('torch', '-')}, "
          f"transformers {v.get('transformers', '-')}, Python {v['python']}; "
          f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`; "
          f"PRNG {jax.config.jax_default_prng_impl}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def flops(jitted, *args):
  """GFLOP of one call of a jitted function: XLA's cost analysis of the lowered program."""
  cost = jitted.lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) / 1e9 if cost else None


class StepGflop:
  """`Contender.gflop` of a training-step figure: our step's count, credited to every side.

  Our builder sets `count` (a function: `flops` of the step). It runs once, when `compare` first
  asks, after every contender is built, and never in a memory child, which does not ask: the
  stages never run a cost analysis, and its conversion of the program to HLO would be counted in
  the child's memory (tiny MAE step loaded from the compilation cache: peak 1171-1177 MiB without
  it, 1186-1192 with it, 2 children each). The value is kept in `built["gflop"]` for the notes
  and the JSON summary.
  """

  def __init__(self, built):
    self.built = built
    self.count = None

  def __call__(self):
    if "gflop" not in self.built:
      self.built["gflop"] = self.count() if self.count else None
    return self.built["gflop"]


# --- peak memory in a subprocess -----------------------------------------------------------------


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def child_peak(contender, warmup=2, calls=1):
  """Runs in the child: peak RSS (MiB) of `calls` calls after warm-up, and the resting RSS.

  Also counts the programs JAX loaded from its persistent compilation cache (`cache_hits`) and
  those it looked up there and compiled (`cache_misses`).
  """
  events = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}

  def count(event, **kwargs):
    del kwargs
    if event in events:
      events[event] += 1

  jax.monitoring.register_event_listener(count)
  call = contender.make()
  for _ in range(warmup):
    call()
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed after compiling goes back to the OS
  resting = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  for _ in range(calls):
    call()
  peak = _status_kib("VmHWM")
  return {"name": contender.name, "peak_mib": peak / 1024, "resting_mib": resting / 1024,
          "step_extra_mib": (peak - resting) / 1024,
          "cache_hits": events["/jax/compilation_cache/cache_hits"],
          "cache_misses": events["/jax/compilation_cache/cache_misses"]}


def measure_memory(contender, compilation_cache_on=True):
  """Starts this figure's module again with --child=NAME; returns its JSON answer (or an error).

  compilation_cache_on=False: the child runs with JAX_ENABLE_COMPILATION_CACHE=false, so it
  compiles everything itself, as the first run of a config on a machine does.
  """
  module = sys.modules["__main__"].__spec__.name
  args = [a for a in sys.argv[1:] if not a.startswith(("--child", "--memory", "--nomemory"))]
  env = dict(os.environ)
  if not compilation_cache_on:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  proc = subprocess.run([sys.executable, "-m", module, *args, f"--child={contender.name}"],
                        capture_output=True, text=True, timeout=1800, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  for line in proc.stdout.splitlines():
    if line.startswith("PEAK "):
      return json.loads(line[5:])
  return {"name": contender.name, "error": (proc.stderr or proc.stdout)[-400:]}


def measure_memory_rounds(contenders, rounds):
  """Peak memory of every contender marked `memory`, alternated: per round one child each, then
  ours (contender 0) with the cache off. Returns {name: median_memory(...)}; ours carries its
  cache-off children under "compiled_here"."""
  mine = [c for c in contenders if c.memory]
  samples = {c.name: [] for c in mine}
  cold = []
  for r in range(rounds):
    for c in mine:
      samples[c.name].append(measure_memory(c))
      print(f"memory round {r + 1}/{rounds} {c.name}: {samples[c.name][-1]}", flush=True)
    if contenders[0].memory:  # ours once more, compiling its step itself (a first run)
      cold.append(measure_memory(contenders[0], compilation_cache_on=False))
      print(f"memory round {r + 1}/{rounds} {contenders[0].name}, cache off: {cold[-1]}", flush=True)
  memory = {name: median_memory(s) for name, s in samples.items()}
  if cold:
    memory[contenders[0].name]["compiled_here"] = median_memory(cold)
  return memory


# --- the comparison --------------------------------------------------------------------------------


def _memory_text(mem):
  peaks = [m["peak_mib"] for m in mem["samples"] if "peak_mib" in m]
  text = f"{mem['peak_mib']:.0f} ({min(peaks):.0f}–{max(peaks):.0f}; step +{mem['step_extra_mib']:.0f})"
  if mem["failed"]:
    text += f", {mem['failed']} child(ren) failed"
  return text


def _rate(contender, seconds, by_gflop):
  if by_gflop:
    return contender.gflop / seconds
  return contender.items / seconds


def compare(figure, title, contenders, *, rounds, warmup, setting, notes=(), extra=None):
  """Times `contenders` side by side; prints and appends the figure; returns its summary dict.

  figure: short id (file name of the JSON summary); title: the section heading;
  setting: one line saying sizes, batches, dtype; notes: lines printed under the table (callables
  are asked after the timing).
  """
  if CHILD.value:  # a memory child: only its own contender, no timing
    mine = [c for c in contenders if c.name == CHILD.value]
    if mine:
      print("PEAK " + json.dumps(child_peak(mine[0])), flush=True)
      sys.exit(0)
    return None
  load_before = os.getloadavg()[0]
  calls, failed = [], {}
  kept = []
  for c in contenders:
    try:
      calls.append(c.make())
      kept.append(c)
    except Exception as e:  # pylint: disable=broad-except  (torch.compile may not work here)
      failed[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      print(f"{c.name}: could not be built: {failed[c.name]}", flush=True)
  contenders = kept
  for c in contenders:  # known once built (e.g. XLA's count of the compiled step)
    if callable(c.gflop):
      c.gflop = c.gflop()
  for i, call in enumerate(calls):
    try:
      for _ in range(warmup):
        call()
    except Exception as e:  # pylint: disable=broad-except
      failed[contenders[i].name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      print(f"{contenders[i].name}: failed in warm-up: {failed[contenders[i].name]}", flush=True)
      calls[i] = None
  keep = [i for i, call in enumerate(calls) if call is not None]
  contenders, calls = [contenders[i] for i in keep], [calls[i] for i in keep]
  times = np.zeros((rounds, len(calls)))
  for r in range(rounds):
    for i, call in enumerate(calls):
      time.sleep(SETTLE.value)
      start = time.perf_counter()
      call()
      times[r, i] = time.perf_counter() - start
    print(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{c.name} {t:.3f} s" for c, t in zip(contenders, times[r])), flush=True)
  memory = {}
  memory_rounds = 1 if QUICK.value else MEMORY_ROUNDS.value
  if MEMORY.value:
    memory = measure_memory_rounds(contenders, memory_rounds)

  ours = contenders[0]
  rows, summary_rows = [], []
  for i, c in enumerate(contenders):
    by_gflop = c.unit != ours.unit
    if by_gflop and (c.gflop is None or ours.gflop is None):
      ratios = None
    else:
      ratios = [_rate(ours, times[r, 0], by_gflop) / _rate(c, times[r, i], by_gflop) for r in range(rounds)]
    median_s = float(np.median(times[:, i]))
    rate = c.items / median_s
    gflops = c.gflop / median_s if c.gflop else None
    mem = memory.get(c.name, {})
    summary_rows.append(dict(name=c.name, median_s=median_s, times=times[:, i].tolist(), rate=rate,
                             unit=c.unit, gflop_per_call=c.gflop, gflops=gflops,
                             ratio_ours_over=float(np.median(ratios)) if ratios else None,
                             ratios=ratios, by_gflop=by_gflop, memory=mem))
    ratio_text = "—" if i == 0 else (
        "n/a" if ratios is None else
        f"**{np.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}){' by GFLOP/s' if by_gflop else ''}")
    if "peak_mib" in mem:
      mem_text = _memory_text(mem)
      if i == 0:
        mem_text += f"; programs from the compilation cache per child: {mem['cache_hits']}"
      cold = mem.get("compiled_here", {})
      if "peak_mib" in cold:
        mem_text += f"; compiling everything itself (cache off, a first run): {_memory_text(cold)}"
      mine = memory.get(ours.name, {})
      per_round = [(label, r) for label, r in (
          ("from the cache", memory_ratios(mine, mem)),
          ("compiled", memory_ratios(mine.get("compiled_here", {}), mem))) if i > 0 and r]
      if per_round:
        mem_text += "; ours ÷ this per round: " + ", ".join(
            f"{label} **{np.median(r):.3f}** ({min(r):.3f}–{max(r):.3f})" for label, r in per_round)
    elif "error" in mem:
      mem_text = "failed"
    else:
      mem_text = ""
    rows.append(f"| {c.name} | {median_s:.3f} | {rate:.2f} {c.unit}/s | "
                f"{'' if gflops is None else f'{gflops:.1f}'} | {ratio_text} | {mem_text} |")
  for name, why in failed.items():
    rows.append(f"| {name} | failed: {why} | | | | |")
  lines = [
      "",
      f"### {title} — {datetime.datetime.now():%Y-%m-%d %H:%M}",
      "",
      f"- command: `{command()}`",
      f"- {setting}; {rounds} rounds alternating the contenders after {warmup} warm-up call(s) each, "
      f"{SETTLE.value:g} s idle before each timed call",
      f"- machine: {machine_line()}; load average before/after {load_before:.2f}/{os.getloadavg()[0]:.2f}",
      "",
      "| contender | median s/call | throughput | GFLOP/s | ours ÷ this: median of per-round ratios (range) "
      + (f"| peak RSS MiB in the step: median of {memory_rounds} alternated children (range; step above "
         "resting) |" if memory else "| peak RSS MiB in the step (not measured for this figure) |"),
      "|---|---|---|---|---|---|",
      *rows,
  ]
  lines += [f"- {n() if callable(n) else n}" for n in notes]
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  if RESULTS_FILE.value and not QUICK.value:
    with open(RESULTS_FILE.value, "a", encoding="utf-8") as f:
      f.write(text)
  summary = dict(figure=figure, title=title, setting=setting, rounds=rounds, warmup=warmup,
                 command=command(), machine=machine_line(), quick=QUICK.value, rows=summary_rows,
                 failed=failed, extra=extra or {})
  write_summary(figure, summary)
  return summary


def write_summary(figure, summary):
  if SUMMARY_DIR.value:
    os.makedirs(SUMMARY_DIR.value, exist_ok=True)
    with open(os.path.join(SUMMARY_DIR.value, f"{figure}.json"), "w") as f:
      json.dump(summary, f, indent=1)


def read_summary(figure):
  path = os.path.join(SUMMARY_DIR.value, f"{figure}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def append_text(text):
  """Prints a free-form section and appends it to RESULTS.md (figures that are not A/B tables)."""
  print(text, flush=True)
  if RESULTS_FILE.value and not QUICK.value:
    with open(RESULTS_FILE.value, "a", encoding="utf-8") as f:
      f.write(text)


def header(title, setting):
  """The heading lines of a free-form section (same fields as `compare`'s)."""
  return "\n".join([
      "", f"### {title} — {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
      f"- command: `{command()}`", f"- {setting}",
      f"- machine: {machine_line()}; load average {os.getloadavg()[0]:.2f}", "", ""])
