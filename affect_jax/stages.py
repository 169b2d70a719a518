"""Which code runs each stage, and the workdir layout the stages share.

A top-level workdir W holds one folder per stage, so that running `configs/va.py` in W reuses
every upstream stage already there:

  W/data/            synthetic data (when no dataset folder is configured) and TFDS files
  W/mae_pretrain/    W/mae_finetune/    W/features/    W/va/  W/expr/  W/au/
"""

import importlib
import json
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


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def config_differences(directory, config):
  """Settings in which `directory`/config.json (what `save_config` wrote) differs from `config`.

  Returns lines 'key: <saved> in PATH, <value> in this run', or None without a config.json.
  """
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = _flatten(json.load(f))
  current = _flatten(json.loads(config.to_json_best_effort()))
  return [f"{key}: {saved[key]!r} in {path}, {current[key]!r} in this run"
          for key in sorted(saved.keys() & current.keys()) if saved[key] != current[key]]


def explain_incompatible(error, checkpoint_directory, upstream_config):
  """`error` (an IncompatibleCheckpointError from the upstream stage's checkpoint) plus the
  settings of the run that wrote it which differ from `upstream_config`, the settings this run
  expects that stage to have had."""
  stage_folder = os.path.dirname(os.path.abspath(checkpoint_directory).rstrip("/"))
  differences = config_differences(stage_folder, upstream_config)
  if differences is None:
    detail = f"No config.json in {stage_folder} tells which settings made it."
  elif differences:
    detail = ("It was made with other settings of stage " + repr(upstream_config.stage) + ":\n  "
              + "\n  ".join(differences[:20]))
  else:
    detail = f"{stage_folder}/config.json names the same settings as this run."
  return type(error)(
      f"{error}\n{detail}\nThis is a configuration mismatch, not damage: nothing was moved. Run "
      f"with the settings that made the checkpoint, or point config.init_from at a checkpoint made "
      f"with this run's, or remove {stage_folder} to make it again.")
