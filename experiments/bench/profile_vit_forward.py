r"""Where the time of our ViT-B/16 forward goes, by kind of compiled thunk (not a side-by-side figure).

  python -m experiments.bench.profile_vit_forward [--batch=8 (vit_forward's flag)] [--calls=3] [--trace_dir=DIR]

Traces --calls calls of the jitted forward (random parameters, 224x224, float32) after two warm-up
calls with `jax.profiler`, reads the trace back with `jax.profiler.ProfileData` and sums XLA's
thunk events per kind over the XLA worker threads. Each YNNPACK fusion is classified by the ops in
its HLO computation (matmul only; softmax with the weights x V product; convolution; reductions).
Prints a markdown table (ms per call summed over threads, share) and the wall time per call,
traced and untraced.
"""

import collections
import glob
import re
import tempfile
import time

from absl import app
from absl import flags
import jax

from experiments.bench import vit_forward

CALLS = flags.DEFINE_integer("calls", 3, "Traced calls.")
TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where to write the trace (default: a temporary folder).")


def ynn_kind(ops):
  if "exponential" in ops:
    return "attention softmax + weights x V (YNNPACK)"
  if "dot" in ops:
    return "matmuls (YNNPACK)"
  if "convolution" in ops:
    return "patch-embedding convolution (YNNPACK)"
  return "reductions, e.g. LayerNorm (YNNPACK)"


def main(argv):
  del argv
  forward, args = vit_forward.random_forward("B", 224, 16, vit_forward.BATCH.value)  # the figure's own forward
  for _ in range(2):
    jax.block_until_ready(forward(*args))
  start = time.perf_counter()
  for _ in range(CALLS.value):
    jax.block_until_ready(forward(*args))
  untraced = (time.perf_counter() - start) / CALLS.value * 1e9
  trace_dir = TRACE_DIR.value or tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(CALLS.value):
    jax.block_until_ready(forward(*args))
  wall = (time.perf_counter() - start) / CALLS.value * 1e9
  jax.profiler.stop_trace()

  hlo = forward.lower(*args).compile().as_text()
  called = dict(re.findall(r"%(ynn_fusion(?:\.\d+)?) = .*?calls=%([\w.\-]+)", hlo))
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  kinds, threads = collections.Counter(), set()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if "Eigen" not in line.name or name.startswith(("ThunkExecutor", "SlinkyThreadPool",
                                                         "Threadpool", "end:")):
          continue
        threads.add(line.name)
        if name.startswith("ynn_fusion"):
          ops = set(re.findall(r"= \S+ (\w+)\(", bodies.get(called.get(name, ""), "")))
          kind = ynn_kind(ops)
        else:
          kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += event.duration_ns
  total = sum(kinds.values())
  print("| thunk kind | ms per call (all threads) | share |\n|---|---|---|")
  for kind, ns in kinds.most_common():
    print(f"| {kind} | {ns / CALLS.value / 1e6:.0f} | {ns / total:.1%} |")
  per_call = total / CALLS.value
  print(f"\nwall {wall / 1e6:.0f} ms per traced call ({untraced / 1e6:.0f} untraced); thunk time "
        f"{per_call / 1e6:.0f} ms per call on {len(threads)} threads ({per_call / wall:.2f} thunks at "
        "once on average; a YNNPACK matmul also works on the other core inside its thunk, so this "
        "is not a utilisation figure)")


if __name__ == "__main__":
  app.run(main)
