"""Runs that survive: SIGKILL at random moments and SIGTERM, then the same command again.

Each test runs the real command line (tests/train/fault_hooks.py = affect_jax.main plus event
logging) in a subprocess. A run is killed with SIGKILL during a training step, during an
evaluation, or just after an asynchronous checkpoint write was issued, restarted with the same
command until it finishes, and compared with an uninterrupted run of the same command: every
training batch (SHA-256 per step, including the steps trained again after a kill) and the final
train state (parameters, optimiser state, step) must be identical, and after every kill every
checkpoint Orbax lists must restore.

AFFECT_JAX_TEST_KILLS (default 10, issue 9's protocol) sets the number of kills per run.
"""

import json
import os
import signal
import subprocess
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from affect_jax import stages
from affect_jax.train import checkpointing
from affect_jax.train import trainer
from conftest import (FINETUNE_OVERRIDES, NUM_KILLS, NUM_TRAIN_STEPS, REPO, VA_OVERRIDES,
                      assert_trees_equal, copy_workdir, read_events, run_stage, stage_command,
                      stage_env)

pytestmark = pytest.mark.slow


def kill_plan(seed, count):
  """`count` kills (phase, occurrence in that process, delay in seconds), phases spread evenly.

  Occurrences start late enough that a checkpoint has usually completed in that process (Orbax
  finishes one asynchronous save before it starts the next), so the runs make progress.
  """
  rng = np.random.default_rng(seed)
  phases = [("batch", "eval", "save")[i % 3] for i in range(count)]
  rng.shuffle(phases)
  plan = []
  for phase in phases:
    if phase == "batch":  # anywhere in or after the step
      plan.append((phase, int(rng.integers(2, 6)), float(rng.uniform(0, 0.3))))
    elif phase == "eval":  # inside the evaluation (the hook holds it open until the kill)
      plan.append((phase, int(rng.integers(1, 3)), float(rng.uniform(0, 0.5))))
    else:  # within 20 ms of issuing the save: its background write is still going on
      plan.append((phase, int(rng.integers(2, 4)), float(rng.uniform(0, 0.02))))
  return plan


def batches_by_step(events, stage):
  """step -> set of batch digests seen for that step (more than one would be a divergence)."""
  seen = {}
  for event in events:
    if event["event"] == "batch" and event["stage"] == stage:
      seen.setdefault(event["step"], set()).add(event["sha"])
  return seen


def checkpoint_listing(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def assert_every_checkpoint_restores(directory):
  """Every step Orbax lists restores (state finite, data-iterator state readable); read-only."""
  if not os.path.isdir(directory):
    return []
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})
  steps = list(manager.all_steps())
  for step in steps:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert int(state["step"]) == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state)
               if np.issubdtype(np.asarray(x).dtype, np.floating))
    data_files = [n for n in os.listdir(os.path.join(directory, str(step), "data")) if n.endswith(".json")]
    assert data_files
    for name in data_files:
      with open(os.path.join(directory, str(step), "data", name)) as f:
        json.load(f)
  manager.close()
  return steps


def final_state(checkpoint_dir):
  return jax.device_get(checkpointing.restore_params(checkpoint_dir))


def kill_until_done(cache_dir, config, workdir, overrides, plan, stage_folder):
  """Runs the command with each planned kill, then once more to the end; returns a history."""
  events_path = os.path.join(workdir, "events.jsonl")
  checkpoint_dir = os.path.join(workdir, stage_folder, "checkpoints")
  history = []
  for kill in list(plan) + [None]:
    seen = len(read_events(events_path))
    spec = None if kill is None else "%s:%d:%.4f" % kill
    result = run_stage(cache_dir, config, workdir, *overrides, events=events_path, kill=spec)
    events = read_events(events_path)[seen:]
    leftovers = [n for n in checkpoint_listing(checkpoint_dir) if n.endswith(".orbax-checkpoint-tmp")]
    if kill is None:
      assert result.returncode == 0, result.stdout[-5000:]
    else:
      assert result.returncode == -signal.SIGKILL, (kill, result.returncode, result.stdout[-5000:])
      assert events[-1]["event"] == "sigkill", events[-3:]
    restorable = assert_every_checkpoint_restores(checkpoint_dir)
    trained = [e["step"] for e in events if e["event"] == "batch"]
    history.append(dict(kill=spec, returncode=result.returncode,
                        trained=(trained[0], trained[-1]) if trained else None,
                        last_event=[e["event"] for e in events if e["event"] != "sigkill"][-1:],
                        unfinished_writes=leftovers, restorable=restorable))
  print("\n".join(json.dumps(h) for h in history))
  return history


def check_identical(workdir, reference_dir, stage, history, num_steps):
  stage_folder = stages.STAGE_DIRS[stage]
  reference = batches_by_step(read_events(os.path.join(reference_dir, "events.jsonl")), stage)
  events = read_events(os.path.join(workdir, "events.jsonl"))
  resumed = batches_by_step(events, stage)
  assert sorted(reference) == list(range(1, num_steps + 1))
  assert sorted(resumed) == sorted(reference)
  diverged = {step: shas for step, shas in resumed.items() if shas != reference[step]}
  assert not diverged  # every step, retrained or not, saw exactly the reference batch
  trained = sum(1 for e in events if e["event"] == "batch")
  print(f"{stage}: {len(history) - 1} kills, {trained} steps trained for {num_steps}")
  assert trained > num_steps  # work lost to kills was redone, on the same batches
  # Restarts continued from checkpoints that killed runs had written (not only from scratch).
  assert history[-1]["trained"][0] > 1
  assert any(h["kill"] and h["trained"] and h["trained"][0] > 1 for h in history)
  final_listing = checkpoint_listing(os.path.join(workdir, stage_folder, "checkpoints"))
  assert not [n for n in final_listing if not n.isdigit() and n != checkpointing.TRASH]
  assert checkpoint_listing(os.path.join(workdir, stage_folder, "checkpoints", checkpointing.TRASH)) == []
  assert_trees_equal(final_state(os.path.join(workdir, stage_folder, "checkpoints")),
                     final_state(os.path.join(reference_dir, stage_folder, "checkpoints")))
  # The kills landed where planned: in steps, in evaluations, and during checkpoint writes.
  if len(history) > 3:
    assert {h["kill"].split(":")[0] for h in history if h["kill"]} == {"batch", "eval", "save"}
  assert any(h["unfinished_writes"] for h in history if h["kill"] and h["kill"].startswith("save"))


def test_temporal_run_killed_at_random_moments_resumes_identically(smoke_chain, jax_cache_dir,
                                                                     tmp_path):
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["features"])
  history = kill_until_done(jax_cache_dir, "configs/va.py:size=smoke", workdir, VA_OVERRIDES,
                            kill_plan(seed=9, count=NUM_KILLS), "va")
  check_identical(workdir, smoke_chain, "va", history, NUM_TRAIN_STEPS)
  with open(os.path.join(workdir, "va", "predictions", "validation.txt")) as f, open(
      os.path.join(smoke_chain, "va", "predictions", "validation.txt")) as g:
    assert f.read() == g.read()


def test_finetune_run_killed_at_random_moments_resumes_identically(finetune_reference,
                                                                     jax_cache_dir, tmp_path):
  workdir = copy_workdir(finetune_reference, str(tmp_path / "W"), stages_to_copy=["data", "mae_pretrain"])
  history = kill_until_done(jax_cache_dir, "configs/mae_finetune.py:size=smoke", workdir,
                            FINETUNE_OVERRIDES, kill_plan(seed=5, count=NUM_KILLS), "mae_finetune")
  check_identical(workdir, finetune_reference, "mae_finetune", history, NUM_TRAIN_STEPS)


def test_sigterm_saves_exits_143_and_the_next_run_continues(smoke_chain, jax_cache_dir, tmp_path):
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["features"])
  events_path = os.path.join(workdir, "events.jsonl")
  process = subprocess.Popen(
      stage_command("configs/va.py:size=smoke", workdir, *VA_OVERRIDES), cwd=REPO,
      env=stage_env(jax_cache_dir, events_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  deadline = time.time() + 600
  while not any(e["event"] == "batch" and e["step"] >= 5 for e in read_events(events_path)):
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == trainer.PREEMPTED_EXIT_CODE == 143, output[-3000:]
  last_step = max(e["step"] for e in read_events(events_path) if e["event"] == "batch")
  assert f"Saved step {last_step} after SIGTERM; exiting with status 143" in output
  checkpoint_dir = os.path.join(workdir, "va", "checkpoints")
  assert max(assert_every_checkpoint_restores(checkpoint_dir)) == last_step
  result = run_stage(jax_cache_dir, "configs/va.py:size=smoke", workdir, *VA_OVERRIDES,
                     events=events_path)
  assert result.returncode == 0, result.stdout[-3000:]
  assert f"Resuming va at step {last_step}" in result.stdout
  resumed_steps = [e["step"] for e in read_events(events_path) if e["event"] == "batch"]
  assert resumed_steps == list(range(1, NUM_TRAIN_STEPS + 1))  # no step trained twice
  reference = batches_by_step(read_events(os.path.join(smoke_chain, "events.jsonl")), "va")
  assert batches_by_step(read_events(events_path), "va") == reference
  assert_trees_equal(final_state(checkpoint_dir),
                     final_state(os.path.join(smoke_chain, "va", "checkpoints")))
