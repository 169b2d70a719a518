r"""Which settings make our steps fastest: the same "ours" call under several environments, alternated.

  python -m experiments.bench.flag_sweep [--quick] [--cases=vit_forward,mae_step_B,temporal_step]
      [--variants=jax,eigen,rbg,eigen_rbg] [--rounds=5]

XLA flags and the PRNG implementation are fixed when a process starts, so each variant is a
persistent worker subprocess (this module with --worker) that builds and warms up one case; the
parent then asks the workers in turn for one timed call, A B C A B C ..., and reports medians and
per-round ratios against the first variant. Variants:
  jax         JAX's defaults (the package sets no process-wide flag; its temporal step is
              compiled with Eigen through a per-function compiler option, see RESULTS.md)
  eigen       jax + XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (Eigen, not YNNPACK)
  rbg         jax + JAX_DEFAULT_PRNG_IMPL=unsafe_rbg
  eigen_rbg   both
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from experiments.bench import harness

CASES = flags.DEFINE_list("cases", ["vit_forward", "mae_step_B", "mae_step_tiny", "temporal_step"],
                          "Which of our calls to time.")
VARIANTS = flags.DEFINE_list("variants", ["jax", "eigen", "rbg", "eigen_rbg"],
                             "Environments to compare (first = reference).")
WORKER = flags.DEFINE_string("worker", None, "Internal: build this case and serve timed calls.")

EIGEN = "--xla_cpu_experimental_ynn_fusion_type="
ENVIRONMENTS = {
    "jax": {},
    "eigen": {"XLA_FLAGS": EIGEN},
    "rbg": {"JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"},
    "eigen_rbg": {"XLA_FLAGS": EIGEN, "JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"},
}


def build(case):
  """One blocking call of ours for `case`."""
  quick = harness.QUICK.value
  if case == "vit_forward":
    from experiments.bench import vit_forward  # pylint: disable=g-import-not-at-top
    return vit_forward.make_ours_random(*(("tiny", 64, 8, 2) if quick else ("B", 224, 16, 8)))
  if case.startswith("mae_step_"):
    from experiments.bench import mae_step  # pylint: disable=g-import-not-at-top
    config, batch = mae_step.preset_config("tiny" if quick else case.split("_")[-1])
    return mae_step.make_ours(config, batch)[0]
  if case == "temporal_step":
    from experiments.bench import temporal_step  # pylint: disable=g-import-not-at-top
    batch, window = temporal_step.sizes()
    return temporal_step.make_ours(temporal_step.paper_config(),
                                   temporal_step.synthetic_batch(batch, window))[0]
  raise ValueError(f"unknown case {case!r}")


def serve(case):
  import jax  # pylint: disable=g-import-not-at-top
  call = build(case)
  for _ in range(harness.settings(5)[1]):
    call()
  print("READY " + json.dumps(dict(xla_flags=os.environ.get("XLA_FLAGS", ""),
                                   prng=jax.config.jax_default_prng_impl)), flush=True)
  for line in sys.stdin:
    if line.strip() != "go":
      break
    start = time.perf_counter()
    call()
    print(f"T {time.perf_counter() - start}", flush=True)


def start_worker(case, variant):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DEFAULT_PRNG_IMPL")}
  env.update(ENVIRONMENTS[variant])
  args = [sys.executable, "-m", "experiments.bench.flag_sweep", f"--worker={case}"]
  if harness.QUICK.value:
    args.append("--quick")
  proc = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  for line in proc.stdout:
    if line.startswith("READY "):
      return proc, json.loads(line[6:])
  raise RuntimeError(f"worker {case}/{variant} exited with {proc.wait()}")


def sweep(case, rounds):
  import numpy as np  # pylint: disable=g-import-not-at-top
  workers, info, times = {}, {}, {v: [] for v in VARIANTS.value}
  for variant in VARIANTS.value:  # one at a time: workers are built before any timing
    workers[variant], info[variant] = start_worker(case, variant)
  try:
    for r in range(rounds):
      for variant, proc in workers.items():
        proc.stdin.write("go\n")
        proc.stdin.flush()
        times[variant].append(float(proc.stdout.readline().split()[1]))
      print(f"{case} round {r + 1}: " + ", ".join(f"{v} {t[-1]:.3f}" for v, t in times.items()), flush=True)
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  ref = VARIANTS.value[0]
  rows = []
  for variant in VARIANTS.value:
    speed = np.asarray(times[ref]) / np.asarray(times[variant])  # >1: this variant is faster
    rows.append(f"| {case} | {variant} | `{info[variant]['xla_flags']}` | {info[variant]['prng']} | "
                f"{np.median(times[variant]):.3f} | {np.median(speed):.3f} ({speed.min():.2f}–{speed.max():.2f}) |")
  return rows


def main(argv):
  del argv
  if WORKER.value:
    serve(WORKER.value)
    return
  rounds, _ = harness.settings(5)
  rows = []
  for case in CASES.value:
    rows += sweep(case, rounds)
  text = harness.header(
      "Settings sweep: our calls under each environment",
      f"{rounds} rounds alternating one persistent worker per environment; speed = median over "
      f"rounds of (reference time / this time), reference = {VARIANTS.value[0]}") + "\n".join([
          "| case | environment | XLA_FLAGS seen | PRNG | median s/call | speed vs reference (range) |",
          "|---|---|---|---|---|---|", *rows]) + "\n"
  harness.append_text(text)


if __name__ == "__main__":
  app.run(main)
