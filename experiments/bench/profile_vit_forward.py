r"""Where the time of our ViT-B/16 forward goes, by kind of compiled thunk (not a side-by-side figure).

  python -m experiments.bench.profile_vit_forward [--batch=8 (vit_forward's flag)] [--calls=3] [--trace_dir=DIR]

Traces --calls calls of the jitted forward (random parameters, 224x224, float32) after two warm-up
calls with `jax.profiler`, reads the trace back with `jax.profiler.ProfileData` and sums XLA's
thunk events per kind over the XLA worker threads. Each YNNPACK fusion is classified by the ops in
its HLO computation (matmul only; softmax with the weights x V product; convolution; reductions).
Prints a markdown table (ms per call summed over threads, share) and the wall time per call,
traced and untraced. `profile_mae_step` does the same for the MAE pre-training step.
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


def thunk_times(call, compiled_text):
  """Traces CALLS calls of `call()` (already warmed up) and sums XLA's thunk time.

  Returns (wall ns per traced call, Counter kind -> ns, Counter (kind, thunk name, shape, op_name)
  -> ns for every thunk, number of XLA threads seen); `compiled_text` is the compiled program's
  as_text().
  """
  trace_dir = TRACE_DIR.value or tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(CALLS.value):
    call()
  wall = (time.perf_counter() - start) / CALLS.value * 1e9
  jax.profiler.stop_trace()

  called = dict(re.findall(r"%(ynn_fusion(?:\.\d+)?) = .*?calls=%([\w.\-]+)", compiled_text))
  bodies = {m.group(1): m.group(2)
            for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", compiled_text, re.S)}
  shapes = dict(re.findall(r"\n\s*%([\w.\-]+) = (\S+)", compiled_text))
  op_names = dict(re.findall(r"\n\s*%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", compiled_text))
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  kinds, thunks, threads = collections.Counter(), collections.Counter(), set()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if "Eigen" not in line.name or name.startswith(("ThunkExecutor", "SlinkyThreadPool",
                                                         "Threadpool", "end:")):
          continue
        threads.add(line.name)
        if name.startswith("ynn_fusion"):
          kind = ynn_kind(set(re.findall(r"= \S+ (\w+)\(", bodies.get(called.get(name, ""), ""))))
        else:
          kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += event.duration_ns
        thunks[(kind, name, shapes.get(name, ""), op_names.get(name, ""))] += event.duration_ns
  return wall, kinds, thunks, len(threads)


def print_kinds(kinds):
  """Prints the table of thunk time per kind (kinds under 0.5 ms per call together); returns ns per call."""
  total = sum(kinds.values())
  print("| thunk kind | ms per call (all threads) | share |\n|---|---|---|")
  rest = 0
  for kind, ns in kinds.most_common():
    if ns / CALLS.value < 5e5:
      rest += ns
    else:
      print(f"| {kind} | {ns / CALLS.value / 1e6:.0f} | {ns / total:.1%} |")
  if rest:
    print(f"| the rest (each under 0.5 ms) | {rest / CALLS.value / 1e6:.0f} | {rest / total:.1%} |")
  return total / CALLS.value


def main(argv):
  del argv
  forward, args = vit_forward.random_forward("B", 224, 16, vit_forward.BATCH.value)  # the figure's own forward
  for _ in range(2):
    jax.block_until_ready(forward(*args))
  start = time.perf_counter()
  for _ in range(CALLS.value):
    jax.block_until_ready(forward(*args))
  untraced = (time.perf_counter() - start) / CALLS.value * 1e9
  wall, kinds, _, threads = thunk_times(lambda: jax.block_until_ready(forward(*args)),
                                        forward.lower(*args).compile().as_text())
  per_call = print_kinds(kinds)
  print(f"\nwall {wall / 1e6:.0f} ms per traced call ({untraced / 1e6:.0f} untraced); thunk time "
        f"{per_call / 1e6:.0f} ms per call on {threads} threads ({per_call / wall:.2f} thunks at "
        "once on average; a YNNPACK matmul also works on the other core inside its thunk, so this "
        "is not a utilisation figure)")


if __name__ == "__main__":
  app.run(main)
