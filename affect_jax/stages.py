"""Which code runs each stage, and the workdir layout the stages share.

A top-level workdir W holds one folder per stage, so that running `configs/va.py` in W reuses
every upstream stage already there:

  W/data/            synthetic data (when no dataset folder is configured) and TFDS files
  W/mae_pretrain/    W/mae_finetune/    W/features/    W/va/  W/expr/  W/au/
"""

import importlib
import os

from absl import logging
import jax

STAGE_MODULES = {
    "mae_pretrain": "affect_jax.train.mae_pretrain",
    "mae_finetune": "affect_jax.train.mae_finetune",
    "extract": "affect_jax.train.extract",
    "va": "affect_jax.train.temporal",
    "expr": "affect_jax.train.temporal",
    "au": "affect_jax.train.temporal",
}
STAGE_DIRS = {"mae_pretrain": "mae_pretrain", "mae_finetune": "mae_finetune", "extract": "features",
              "va": "va", "expr": "expr", "au": "au"}
UPSTREAM = {"mae_finetune": "mae_pretrain", "extract": "mae_finetune",
            "va": "extract", "expr": "extract", "au": "extract"}


def validate(config):
  """Checks what the config system cannot: known stage, consistent sizes."""
  if config.stage not in STAGE_MODULES:
    raise ValueError(f"config.stage={config.stage!r}; known stages: {sorted(STAGE_MODULES)}")
  expected_upstream = UPSTREAM.get(config.stage)
  if expected_upstream and config.upstream.stage != expected_upstream:
    raise ValueError(f"Stage {config.stage!r} needs upstream {expected_upstream!r}, "
                     f"got {config.upstream.stage!r}")
  if config.data.bad_data not in ("error", "skip"):
    raise ValueError(f"config.data.bad_data={config.data.bad_data!r}; expected 'error' or 'skip'")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r}; expected 'float32' or 'bfloat16'")
  if "upstream" in config:
    validate(config.upstream)


def prepare_workdir(workdir):
  """Creates the workdir and refuses, before any work, one that cannot be written."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SystemExit(f"Workdir {workdir} is not writable: {e}") from e
  return workdir


def stage_dir(workdir, stage):
  return os.path.join(workdir, STAGE_DIRS[stage])


def output_dir(config, workdir):
  """Where `config`'s stage writes; folds 1..4 of a temporal task get W/<task>_fold<K> so that
  they never resume each other's checkpoints."""
  fold = config.get("fold", 0) if config.stage in ("va", "expr", "au") else 0
  return stage_dir(workdir, config.stage) + (f"_fold{fold}" if fold else "")


def data_root(config, workdir):
  return config.data.root or os.path.join(workdir, "data")


def run(config, workdir):
  """Runs `config.stage` in `workdir` (the top-level workdir)."""
  module_name = STAGE_MODULES[config.stage]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise SystemExit(f"Stage {config.stage!r} is not built yet ({module_name} does not exist).") from e
    raise
  directory = output_dir(config, workdir)
  logging.info("Running stage %s in %s", config.stage, directory)
  save_config(config, directory)
  return module.train_and_evaluate(config, workdir)


def save_config(config, directory):
  """The resolved config beside the stage's outputs, so `predict` and people can rebuild its model."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  os.replace(path + ".tmp", path)
