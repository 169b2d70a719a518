r"""Which part of the temporal model helps: the same features, five predictors, one table.

  python -m experiments.temporal_ablation --workdir=W [--task=va] [--size=tiny] [--seeds=0,1,2]

W must hold extracted features (W/features, e.g. from the main job). Each variant trains in
W/ablation/<variant>/ (W/ablation/<variant>_seed<K>/ for seed K > 0) on the same fold-0 split with
the same optimiser and steps, once per seed (initialisation, dropout and data order), and is scored
under the challenge protocol (affect_jax.train.temporal); the table gives each seed's main score
and the mean ± std over seeds. Variants:
  train_mean          predict the training-set mean label (VA) / majority class (EXPR) / base rate (AU)
  per_frame_mlp       no TCN, no Transformer: projection + head on each frame
  tcn_only            TCN + projection + head
  transformer_only    projection + Transformer + head
  tcn_transformer     the full model (TCN -> Transformer -> head)
Appends the table to experiments/RESULTS_ablation.md.
"""

import datetime
import json
import os
import platform

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax import metrics
from affect_jax.data import synthetic
from affect_jax.train import tasks
from affect_jax.train import temporal
from configs import temporal as temporal_configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with W/features.", required=True)
_TASK = flags.DEFINE_enum("task", "va", ["va", "expr", "au"], "Task.")
_SIZE = flags.DEFINE_string("size", "tiny", "Config size.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds; each variant trains once per seed.")

VARIANTS = {
    "per_frame_mlp": dict(tcn_channels=(), tcn_dilations=(), num_layers=0),
    "tcn_only": dict(num_layers=0),
    "transformer_only": dict(tcn_channels=(), tcn_dilations=()),
    "tcn_transformer": dict(),
}


def train_mean_scores(config, workdir):
  """Scores of a constant prediction fitted on the training videos."""
  task = tasks.TASKS[config.task]
  train_src, val_src, _ = temporal.fold_sources(config, os.path.join(workdir, "features"), config.task)
  key = task.label_key

  def gather(source):
    labels = np.concatenate([np.asarray(r[key]) for r in source])
    valid = np.concatenate([np.asarray(r[f"{key}_valid"], bool) for r in source])
    return labels, valid

  labels, valid = gather(train_src)
  val_labels, val_valid = gather(val_src)
  if task.name == "va":
    outputs = np.broadcast_to(labels[valid].mean(0), val_labels.shape)
  elif task.name == "expr":
    counts = np.bincount(labels[valid], minlength=8)
    outputs = np.broadcast_to(np.log(counts / counts.sum() + 1e-9), val_labels.shape + (8,))
  else:
    rate = labels[valid].mean(0).clip(1e-6, 1 - 1e-6)
    outputs = np.broadcast_to(np.log(rate / (1 - rate)), val_labels.shape)
  stats = task.stats(jnp.asarray(outputs, jnp.float32), jnp.asarray(val_labels), jnp.asarray(val_valid))
  scores = metrics.compute(stats)
  if task.name == "au":  # tuned as the temporal stage tunes (affect_jax.train.temporal)
    scores["au_f1_tuned"] = float(stats.tune_thresholds()[2])
  return scores


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  task = tasks.TASKS[_TASK.value]
  seeds = [int(k) for k in _SEEDS.value]
  train_mean = train_mean_scores(temporal_configs.get_temporal_config(_TASK.value, _SIZE.value), workdir)
  rows = {"train_mean": [train_mean] * len(seeds)}  # a constant: the same for every seed
  for name, overrides in VARIANTS.items():
    rows[name] = []
    for seed in seeds:
      config = temporal_configs.get_temporal_config(_TASK.value, _SIZE.value)
      config.model.update(overrides)
      config.seed = seed
      variant_dir = os.path.join(workdir, "ablation", name + (f"_seed{seed}" if seed else ""))
      os.makedirs(variant_dir, exist_ok=True)
      link = os.path.join(variant_dir, "features")
      if not os.path.exists(link):
        os.symlink(os.path.join(workdir, "features"), link)
      rows[name].append(temporal.train_and_evaluate(config, variant_dir))
  metric = task.main_metric
  extra = {"va": ("ccc_valence", "ccc_arousal"), "expr": ("expr_accuracy",), "au": ("au_f1_tuned",)}[task.name]

  def mean_std(runs, key):
    values = np.asarray([r.get(key, float("nan")) for r in runs])
    return f"{values.mean():.4f} ± {values.std():.4f}"

  header = (f"| variant | {metric}, mean ± std over seeds | " + " | ".join(f"{metric} seed {k}" for k in seeds)
            + " | " + " | ".join(f"{k}, mean" for k in extra) + " |")
  lines = [header, "|" + "---|" * (2 + len(seeds) + len(extra))]
  for name, runs in rows.items():
    lines.append(f"| {name} | {mean_std(runs, metric)} | "
                 + " | ".join(f"{r.get(metric, float('nan')):.4f}" for r in runs) + " | "
                 + " | ".join(f"{np.mean([r.get(k, float('nan')) for r in runs]):.4f}" for k in extra) + " |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(os.path.dirname(__file__), "RESULTS_ablation.md"), "a") as f:
    f.write(f"\n## {task.name}, size {_SIZE.value}, {datetime.date.today()} — {platform.node()}, "
            f"{os.cpu_count()} CPUs, jax {jax.__version__}\n\n"
            f"Command: `python -m experiments.temporal_ablation --workdir={_WORKDIR.value} "
            f"--task={_TASK.value} --size={_SIZE.value} --seeds={','.join(_SEEDS.value)}`\n\n"
            f"{data_line(_WORKDIR.value)}{table}\n")


def data_line(workdir):
  """What the features were made from: the synthetic generator's settings, when the workdir has them."""
  path = synthetic.summary_path(os.path.join(workdir, "data", "synthetic"))
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    settings = json.load(f).get("settings")
  if not settings:
    return ""
  return "Synthetic data: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) + "\n\n"


if __name__ == "__main__":
  app.run(main)
