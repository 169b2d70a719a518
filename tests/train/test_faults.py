"""Faults met by a running stage: a damaged newest checkpoint, NaN / inf losses.

The first tests run the shared loop (`trainer.run_loop`) in-process on the tiny regressor of
tests/conftest.py; the slow one runs the VA stage's command line on the smoke chain's outputs.
(A checkpoint of another model shape: test_checkpointing.py, through the same loop.)
"""

import glob
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from affect_jax.train import checkpointing
from affect_jax.train import trainer
from conftest import (VA_OVERRIDES, assert_trees_equal, copy_workdir, run_stage, run_tiny,
                      step_folders, tiny_examples, tiny_loop)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _all_checkpoints(workdir):
  """step -> saved state (numpy) of every checkpoint in workdir/checkpoints."""
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return {step: jax.device_get(checkpointer.manager.restore(
        step, args=checkpointing.ocp.args.Composite(
            state=checkpointing.ocp.args.StandardRestore()))["state"])
            for step in checkpointer.all_steps()}
  finally:
    checkpointer.close()


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# ---------------------------------------------------------------------------------------------
# Damaged newest checkpoint.


def test_damaged_newest_checkpoint_run_continues_from_the_previous_one(tiny_reference, four_steps,
                                                                         tmp_path):
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "d", "*")):
    _truncate(path)
  resumed = run_tiny(workdir, num_train_steps=6)  # saves step 4 again: no collision
  assert_trees_equal(resumed, tiny_reference)
  assert step_folders(os.path.join(workdir, "checkpoints")) == ["4", "5", "6"]
  assert os.listdir(os.path.join(workdir, "checkpoints.damaged")) == ["4"]


# ---------------------------------------------------------------------------------------------
# Non-finite values. Batches are in order (no shuffle): examples 2k-2, 2k-1 train step k.


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_loss_stops_training_naming_the_step(tmp_path, bad):
  examples = tiny_examples(nan_at=[4] if bad == "nan" else [], inf_at=[5] if bad == "inf" else [])
  with pytest.raises(FloatingPointError,
                     match=r"Non-finite loss or gradient at step 3 of stage tiny \(loss=(nan|inf)\)"):
    run_tiny(tmp_path, num_train_steps=6, examples=examples, shuffle_seed=None)
  saved = _all_checkpoints(str(tmp_path))
  assert sorted(saved) == [1, 2]  # step 3 was never applied, so never saved
  assert all(_all_finite(state) for state in saved.values())


def test_nonfinite_skip_drops_and_counts_the_updates(tmp_path):
  examples = tiny_examples(nan_at=[4], inf_at=[9])  # steps 3 and 5
  final = run_tiny(tmp_path, num_train_steps=6, examples=examples, shuffle_seed=None,
                   on_nonfinite="skip", keep_checkpoints=6)
  assert int(final.step) == 6 and int(final.skipped_updates) == 2
  saved = _all_checkpoints(str(tmp_path))
  assert sorted(saved) == [1, 2, 3, 4, 5, 6]
  assert all(_all_finite(state) for state in saved.values())
  # A skipped update leaves parameters, optimiser and batch statistics as they were.
  for before, after in ((2, 3), (4, 5)):
    for part in ("params", "opt_state", "batch_stats"):
      assert_trees_equal(saved[after][part], saved[before][part])
    assert int(saved[after]["skipped_updates"]) == int(saved[before]["skipped_updates"]) + 1
  assert not np.array_equal(saved[4]["params"]["out"]["kernel"], saved[3]["params"]["out"]["kernel"])
  # The count reaches TensorBoard (logged every 2 steps).
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  counts = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in events.Tensors("train/skipped_updates")}
  assert counts == {2: 0.0, 4: 1.0, 6: 2.0}


# ---------------------------------------------------------------------------------------------
# The same faults met by the VA stage's command line.


@pytest.mark.slow
def test_stage_falls_back_from_a_damaged_checkpoint_to_the_same_result(smoke_chain, jax_cache_dir,
                                                                        tmp_path):
  workdir = copy_workdir(smoke_chain, str(tmp_path / "W"), stages_to_copy=["features", "va"])
  checkpoints = os.path.join(workdir, "va", "checkpoints")
  newest = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  os.remove(os.path.join(checkpoints, str(newest), "state", "manifest.ocdbt"))
  previous = max(int(n) for n in os.listdir(checkpoints) if n.isdigit() and int(n) < newest)
  result = run_stage(jax_cache_dir, "configs/va.py:size=smoke", workdir, *VA_OVERRIDES)
  assert result.returncode == 0, result.stdout[-3000:]
  assert (f"Checkpoint {checkpoints}/{newest} is damaged (missing state/manifest.ocdbt; "
          in result.stdout)
  assert f"Resuming va at step {previous}" in result.stdout
  assert_trees_equal(jax.device_get(checkpointing.restore_params(checkpoints)),
                     jax.device_get(checkpointing.restore_params(
                         os.path.join(smoke_chain, "va", "checkpoints"))))


class _SigtermOnFlush:
  """A metric writer that sends this process SIGTERM while the loop flushes after `step`."""

  def __init__(self, writer, step):
    self.writer, self.step, self.last = writer, step, None

  def write_scalars(self, step, scalars):
    self.last = step
    self.writer.write_scalars(step, scalars)

  def flush(self):
    self.writer.flush()
    if self.last == self.step:
      self.last = None
      os.kill(os.getpid(), signal.SIGTERM)

  def __getattr__(self, name):
    return getattr(self.writer, name)


def test_sigterm_between_the_save_decision_and_the_exit_still_saves_the_step_it_names(tmp_path):
  # Step 4 is no checkpoint step (every 3); the signal lands after its save decision was taken.
  loop = tiny_loop(tmp_path, num_train_steps=12, checkpoint_every_steps=3, log_every_steps=1)
  writer = trainer.create_writer(str(tmp_path))
  try:
    with pytest.raises(SystemExit) as exit_info:
      trainer.run_loop(loop, _SigtermOnFlush(writer, step=4))
  finally:
    writer.close()
  assert exit_info.value.code == trainer.PREEMPTED_EXIT_CODE
  steps = checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps()
  assert steps[-1] == 5, steps  # the next step is trained and saved before exiting, not lost
