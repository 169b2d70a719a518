r"""Runs every fold of a task and prints a table shaped like the paper's Table 1.

  python -m experiments.five_folds --workdir=W [--task=va] [--size=tiny] [--affwild2=DIR]

Fold 0 is the official Train/Validation split; folds 1-4 a 4-way split by video over
Train ∪ Validation (affect_jax.data.folds). All folds share W's upstream stages (data, MAE,
fine-tuning, features); each fold trains in W/<task> or W/<task>_fold<K>. Appends the table to
experiments/RESULTS_folds.md.
"""

import datetime
import os
import platform

from absl import app
from absl import flags
import jax
import numpy as np

from affect_jax import stages
from configs import temporal as temporal_configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir shared by the folds.", required=True)
_TASK = flags.DEFINE_enum("task", "va", ["va", "expr", "au"], "Task.")
_SIZE = flags.DEFINE_string("size", "auto", "Config size.")
_AFFWILD2 = flags.DEFINE_string("affwild2", "", "Aff-Wild2 folder (empty = synthetic default).")
_FOLDS = flags.DEFINE_list("folds", ["0", "1", "2", "3", "4"], "Folds to run.")

PAPER = {  # paper Table 1, folds 0..4
    "ccc_valence": (0.5385, 0.6404, 0.4926, 0.5863, 0.5403),
    "ccc_arousal": (0.6224, 0.5651, 0.6015, 0.6812, 0.6342),
    "expr_f1": (0.4561, 0.4478, 0.4463, 0.4583, 0.4506),
    "au_f1": (0.5762, 0.5566, 0.5018, 0.5556, 0.5819),
}
ROWS = {"va": ("ccc_valence", "ccc_arousal", "p_va"), "expr": ("expr_f1",), "au": ("au_f1", "au_f1_tuned")}


def main(argv):
  del argv
  workdir = stages.prepare_workdir(_WORKDIR.value)
  folds = [int(f) for f in _FOLDS.value]
  results = {}
  for fold in folds:
    arg = f"fold={fold},size={_SIZE.value}" + (f",affwild2={_AFFWILD2.value}" if _AFFWILD2.value else "")
    config = temporal_configs.get_temporal_config(_TASK.value, arg)
    results[fold] = stages.run(config, workdir)
  lines = ["| metric | " + " | ".join(f"fold {k}" for k in folds) + " | mean ± std |",
           "|---|" + "---|" * (len(folds) + 1)]
  for metric in ROWS[_TASK.value]:
    values = np.asarray([results[k][metric] for k in folds])
    lines.append(f"| {metric} (ours) | " + " | ".join(f"{v:.4f}" for v in values)
                 + f" | {values.mean():.4f} ± {values.std():.4f} |")
    if metric in PAPER:
      paper = np.asarray([PAPER[metric][k] for k in folds])
      lines.append(f"| {metric} (paper, Aff-Wild2) | " + " | ".join(f"{v:.4f}" for v in paper)
                   + f" | {paper.mean():.4f} ± {paper.std():.4f} |")
  table = "\n".join(lines)
  print(table)
  data = _AFFWILD2.value or "synthetic default"
  with open(os.path.join(os.path.dirname(__file__), "RESULTS_folds.md"), "a") as f:
    f.write(f"\n## {_TASK.value}, {data}, size {_SIZE.value}, {datetime.date.today()} — "
            f"{platform.node()}, {os.cpu_count()} CPUs, jax {jax.__version__}\n\n"
            f"Command: `python -m experiments.five_folds --workdir={_WORKDIR.value} --task={_TASK.value} "
            f"--size={_SIZE.value}`\n\n{table}\n")


if __name__ == "__main__":
  app.run(main)
