r"""Every benchmark figure in sequence: the one run RESULTS.md reports.

  python -m experiments.bench.run_all [--quick] [--only=vit_forward,mae_step,...]

Each figure runs as its own process (`python -m experiments.bench.<figure>`, the command its
section in RESULTS.md names), in this order, matmul_peak last because it reads the others'
summaries. A heading with the date, machine and command opens the run in RESULTS.md; the JSON
summaries of the previous run are cleared first.
"""

import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

from experiments.bench import harness

FIGURES = ("vit_forward", "mae_step", "temporal_step", "pipelines", "predict", "growth", "matmul_peak")
ONLY = flags.DEFINE_list("only", list(FIGURES), "Figures to run, in the order of FIGURES.")


def main(argv):
  del argv
  if harness.SUMMARY_DIR.value and os.path.isdir(harness.SUMMARY_DIR.value):
    shutil.rmtree(harness.SUMMARY_DIR.value)
  harness.append_text("\n" + harness.header(
      "Run of all figures", "the figures below come from this one run, in this order"))
  passed = [f"--summary_dir={harness.SUMMARY_DIR.value}"]
  if harness.RESULTS_FILE.value != harness.RESULTS_FILE.default:
    passed.append(f"--results_file={harness.RESULTS_FILE.value}")
  if harness.QUICK.value:
    passed.append("--quick")
  if not harness.MEMORY.value:
    passed.append("--nomemory")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  timings = []
  for figure in FIGURES:
    if figure not in ONLY.value:
      continue
    start = time.time()
    print(f"=== {figure}", flush=True)
    code = subprocess.call([sys.executable, "-m", f"experiments.bench.{figure}", *passed], cwd=root)
    timings.append(f"{figure} {time.time() - start:.0f} s" + ("" if code == 0 else f" (exit {code})"))
  harness.append_text("\n- run_all wall time per figure: " + ", ".join(timings) + "\n")


if __name__ == "__main__":
  app.run(main)
