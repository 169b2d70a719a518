"""Shared fixtures: a tiny in-process training loop, a tiny feature store, and stage subprocesses.

The subprocess helpers run the real command line (`tests/train/fault_hooks.py`, which is
`affect_jax.main` plus test-only event logging and planned SIGKILLs) with the stage's own
compilation cache in a folder shared by the whole session, so that restarts do not recompile.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from flax import linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_HOOKS = os.path.join(REPO, "tests", "train", "fault_hooks.py")
FEATURE_DIM = 32  # the smoke encoder's width: the same shapes (and compiled code) as the smoke chain


# ---------------------------------------------------------------------------------------------
# A tiny loop run in-process: Dense -> BatchNorm -> Dense regression over a Grain iterator.


class TinyRegressor(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(self.width, name="hidden")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(x)
    return nn.Dense(2, name="out")(nn.relu(x))


def tiny_examples(num_examples=64, nan_at=(), inf_at=()):
  """Regression examples; `nan_at` / `inf_at` put a NaN / inf into those examples' inputs."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_examples, 3)).astype(np.float32)
  y = np.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], -1).astype(np.float32)
  x[list(nan_at), 1] = np.nan
  x[list(inf_at), 2] = np.inf
  return [{"x": x[i], "y": y[i]} for i in range(num_examples)]


def tiny_iterator(examples, batch_size=2, seed=0):
  """A checkpointable Grain iterator; example i is in batch i // batch_size of the first epoch."""
  ds = grain.MapDataset.source(examples)
  if seed is not None:
    ds = ds.shuffle(seed)
  return iter(ds.repeat().to_iter_dataset().batch(batch_size, drop_remainder=True))


def tiny_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      stage="tiny", keep_checkpoints=3, log_every_steps=2, checkpoint_every_steps=1,
      on_nonfinite="stop", seed=0))
  config.update(overrides)
  return config


def tiny_loop(workdir, *, num_train_steps, width=4, examples=None, shuffle_seed=0, evaluate=None,
              eval_every_steps=0, **config_overrides):
  """A trainer.Loop for TinyRegressor, built the way the stages build theirs."""
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  config = tiny_config(**config_overrides)
  mesh = trainer.make_mesh((("data", -1), ("fsdp", 1), ("model", 1)))
  model = TinyRegressor(width)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  state, shardings = trainer.create_train_state(
      model, tx, dict(x=jax.ShapeDtypeStruct((2, 3), jnp.float32)), jax.random.key(0), mesh)

  def loss_fn(params, batch_stats, batch, rngs):
    del rngs
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                               train=True, mutable=["batch_stats"])
    return jnp.mean((out - batch["y"]) ** 2), ({}, mutated["batch_stats"])

  train_step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed)
  iterator = tiny_iterator(examples if examples is not None else tiny_examples(), seed=shuffle_seed)
  return trainer.Loop(config=config, workdir=str(workdir), state=state, train_step=train_step,
                      train_iterator=iterator, mesh=mesh, num_train_steps=num_train_steps,
                      steps_per_epoch=8, evaluate=evaluate, eval_every_steps=eval_every_steps,
                      best_metric="score" if evaluate else None)


def run_tiny(workdir, **kwargs):
  """Runs tiny_loop to the end; returns (final state as numpy, [per-step metrics])."""
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  loop = tiny_loop(workdir, **kwargs)
  writer = trainer.create_writer(str(workdir))
  try:
    state, _ = trainer.run_loop(loop, writer)
  finally:
    writer.close()
  return jax.device_get(state)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
  """Final state (numpy) of an uninterrupted 6-step tiny run (checkpoint every step, 3 kept)."""
  return run_tiny(tmp_path_factory.mktemp("tiny_reference"), num_train_steps=6)


@pytest.fixture(scope="session")
def four_steps(tmp_path_factory):
  """Workdir of the same tiny run stopped after step 4: checkpoints 2, 3, 4."""
  workdir = tmp_path_factory.mktemp("tiny_four_steps")
  run_tiny(workdir, num_train_steps=4)
  return str(workdir)


def step_folders(directory):
  """Names of the step folders in a checkpoint folder (what Orbax lists), sorted by step."""
  return sorted((n for n in os.listdir(directory) if n.isdigit()), key=int)


def assert_trees_equal(actual, expected):
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
  for (path, a), (_, e) in zip(flat_a, flat_e):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# A tiny feature store, so that the temporal stages skip extraction.


def feature_record(video_id, num_frames, seed, labels=("va",)):
  """A feature-store record whose VA labels follow its features (a learnable signal)."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(num_frames, FEATURE_DIM)).astype(np.float32)
  smooth = np.cumsum(features[:, :2], 0) / np.sqrt(np.arange(1, num_frames + 1))[:, None]
  va = np.tanh(smooth).astype(np.float32)
  va_valid = np.ones(num_frames, bool)
  va_valid[::7] = False  # invalid labels (-5 in the files) are never scored
  va[~va_valid] = -5.0
  expr = rng.integers(0, 8, num_frames).astype(np.int32)
  au = rng.integers(0, 2, (num_frames, 12)).astype(np.int32)
  return {
      "video_id": video_id, "num_frames": num_frames,
      "has_face": np.ones(num_frames, bool),
      "va": va, "va_valid": va_valid if "va" in labels else np.zeros(num_frames, bool),
      "expr": expr, "expr_valid": np.full(num_frames, "expr" in labels),
      "au": au, "au_valid": np.full(num_frames, "au" in labels),
      "labels_va": "va" in labels, "labels_expr": "expr" in labels, "labels_au": "au" in labels,
      "features": features,
  }


# 4 training videos of 50 frames: windows of 30 every 20 give 8 windows = 2 steps of 4 per epoch.
# Validation: 45 frames, and 25 frames (shorter than one window: padded, still scored).
TINY_STORE_VIDEOS = {
    "train": [("1-30-640x360", 50), ("2-30-640x360", 50), ("3-30-640x360_left", 50),
              ("3-30-640x360_right", 50)],
    "validation": [("4-30-640x360", 45), ("5-30-640x360", 25)],
}


def write_tiny_store(workdir, videos=None):
  """W/features holding the tiny store (the `extract` stage's output folder)."""
  from affect_jax import stages  # pylint: disable=g-import-not-at-top
  from affect_jax.data import feature_store  # pylint: disable=g-import-not-at-top
  videos = videos or TINY_STORE_VIDEOS
  seeds = iter(range(100))
  records = {split: [feature_record(v, n, next(seeds)) for v, n in items]
             for split, items in videos.items()}
  feature_store.write_feature_store(stages.stage_dir(str(workdir), "extract"), records, FEATURE_DIM)
  return records


# ---------------------------------------------------------------------------------------------
# Stage subprocesses.


def stage_env(cache_dir, events=None, kill=None):
  # The stage turns on its compilation cache itself (affect_jax/compilation_cache.py); the
  # session's folder stands in for the user's ~/.cache, and no JAX cache setting is inherited.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE",
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  env.update(XDG_CACHE_HOME=cache_dir, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("AFFECT_JAX_TEST_EVENTS", None)
  env.pop("AFFECT_JAX_TEST_KILL", None)
  if events:
    env["AFFECT_JAX_TEST_EVENTS"] = str(events)
  if kill:
    env["AFFECT_JAX_TEST_KILL"] = kill
  return env


def stage_command(config, workdir, *overrides):
  return [sys.executable, FAULT_HOOKS, f"--config={os.path.join(REPO, config)}",
          f"--workdir={workdir}", *overrides]


def run_stage(cache_dir, config, workdir, *overrides, events=None, kill=None, timeout=300):
  """Runs one stage command to its end; returns the CompletedProcess (stdout+stderr in .stdout)."""
  if events:
    os.makedirs(os.path.dirname(str(events)), exist_ok=True)
  return subprocess.run(stage_command(config, workdir, *overrides), cwd=REPO,
                        env=stage_env(cache_dir, events, kill), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def read_events(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def copy_workdir(source, destination, *, stages_to_copy):
  os.makedirs(destination, exist_ok=True)
  for name in stages_to_copy:
    shutil.copytree(os.path.join(source, name), os.path.join(destination, name), symlinks=True)
  return str(destination)


def _build_once(tmp_path_factory, name, build):
  """Builds `name` once per test session, also under pytest-xdist (workers share it, file lock)."""
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  if os.environ.get("AFFECT_JAX_TEST_REUSE_DIR"):  # developers: keep built runs across sessions
    root = pathlib.Path(os.environ["AFFECT_JAX_TEST_REUSE_DIR"])
    root.mkdir(parents=True, exist_ok=True)
  target = root / name
  with filelock.FileLock(str(target) + ".lock"):
    if not (target / ".built").exists():
      shutil.rmtree(target, ignore_errors=True)
      target.mkdir(parents=True)
      build(target)
      (target / ".built").write_text("ok")
  return target


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
  return str(_build_once(tmp_path_factory, "jax_compilation_cache", lambda target: None))


# Number of SIGKILLs per resumed run (issue 9 asks for 10; 5 keeps the default suite short).
NUM_KILLS = int(os.environ.get("AFFECT_JAX_TEST_KILLS", "10"))
# Enough steps that every planned kill lands before the run ends: a killed run advances at most 8
# steps (test_resume.kill_plan), 6.4 on average over its phases.
NUM_TRAIN_STEPS = 6 * NUM_KILLS + 6
VA_OVERRIDES = (f"--config.num_train_steps={NUM_TRAIN_STEPS}", "--config.checkpoint_every_steps=3")
# Mixup on, so that the resume tests also prove its draws are a function of the step.
FINETUNE_OVERRIDES = (f"--config.num_train_steps={NUM_TRAIN_STEPS}",
                      "--config.checkpoint_every_steps=3", "--config.eval_every_steps=4",
                      "--config.mixup_alpha=0.8")


def _run_checked(cache_dir, config, workdir, *overrides, events=None):
  result = run_stage(cache_dir, config, workdir, *overrides, events=events, timeout=900)
  with open(os.path.join(os.path.dirname(workdir), "stage_output.txt"), "a") as f:
    f.write(result.stdout)
  assert result.returncode == 0, result.stdout[-5000:]
  return result


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory, jax_cache_dir):
  """The whole method on the synthetic default, smoke size: data, MAE, fine-tuning, features, VA.

  `python -m affect_jax.main --config=configs/va.py:size=smoke --workdir=W` (with the VA run
  lengthened by VA_OVERRIDES); W/events.jsonl records every VA training batch.
  """
  def build(target):
    _run_checked(jax_cache_dir, "configs/va.py:size=smoke", str(target / "W"), *VA_OVERRIDES,
                 events=str(target / "W" / "events.jsonl"))
  return str(_build_once(tmp_path_factory, f"smoke_chain_{NUM_TRAIN_STEPS}_steps", build) / "W")


@pytest.fixture(scope="session")
def finetune_reference(tmp_path_factory, jax_cache_dir, smoke_chain):
  """An uninterrupted fine-tuning run (FINETUNE_OVERRIDES) on smoke_chain's data and MAE."""
  def build(target):
    workdir = copy_workdir(smoke_chain, str(target / "W"), stages_to_copy=["data", "mae_pretrain"])
    _run_checked(jax_cache_dir, "configs/mae_finetune.py:size=smoke", workdir, *FINETUNE_OVERRIDES,
                 events=os.path.join(workdir, "events.jsonl"))
  return str(_build_once(tmp_path_factory, f"finetune_reference_{NUM_TRAIN_STEPS}_steps", build) / "W")
