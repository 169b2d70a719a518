"""Checkpoints: resume names, damaged checkpoints, incompatible configs, non-finite values.

Everything runs the shared trainer loop (`trainer.run_loop`) in-process on a tiny
Dense -> BatchNorm -> Dense regressor (tests/conftest.py), so each case takes a second or two.
"""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from affect_jax.train import checkpointing
from conftest import assert_trees_equal, run_tiny, tiny_examples, tiny_loop


def abstract_of(state):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_latest(workdir, **loop_kwargs):
  """(step, state as numpy) of the newest restorable checkpoint, read as the loop reads it."""
  loop = tiny_loop(workdir, num_train_steps=1, **loop_kwargs)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step, state = checkpointer.restore(abstract_of(loop.state), loop.train_iterator)
  finally:
    checkpointer.close()
  return step, jax.device_get(state)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run (checkpoint every step, the last 3 kept)."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, run_tiny(workdir, num_train_steps=6)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A run stopped after step 4: checkpoints 2, 3, 4."""
  workdir = tmp_path_factory.mktemp("four_steps")
  run_tiny(workdir, num_train_steps=4)
  return str(workdir)


def test_saved_names_match_the_live_state_and_resume_is_exact(reference, four_steps, tmp_path):
  # Orbax's metadata spells paths as dicts/lists ('opt_state/1/mu/...'), the live TrainState as
  # attributes/tuples; the compatibility check must see them as the same parameters.
  _, expected = reference
  checkpointer = checkpointing.Checkpointer(os.path.join(four_steps, "checkpoints"))
  saved = checkpointer.item_shapes(4)
  checkpointer.close()
  live = checkpointing._shapes(tiny_loop(tmp_path, num_train_steps=1).state)  # pylint: disable=protected-access
  assert saved == live
  assert saved["params/hidden/kernel"] == (3, 4) and saved["opt_state/1/0/mu/out/kernel"] == (4, 2)
  workdir = shutil.copytree(four_steps, tmp_path / "resumed")
  resumed = run_tiny(workdir, num_train_steps=6)
  assert int(resumed.step) == 6
  assert_trees_equal(resumed, expected)


def test_incompatible_checkpoint_is_refused_naming_the_parameters(four_steps, tmp_path):
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
    run_tiny(workdir, num_train_steps=6, width=5)
  message = str(error.value)
  assert f"Checkpoint {workdir}/checkpoints/4 does not fit this config" in message
  assert "params/hidden/kernel: checkpoint (3, 4), config (3, 5)" in message
  assert "params/out/kernel: checkpoint (4, 2), config (5, 2)" in message
  assert "batch_stats/norm/mean: checkpoint (4,), config (5,)" in message
  assert "opt_state/1/0/mu/hidden/bias: checkpoint (4,), config (5,)" in message
  assert "params/out/bias" not in message  # same shape: not a difference
  differing = [line for line in message.splitlines() if ": checkpoint (" in line]
  # hidden kernel+bias, norm scale+bias, out kernel: in params, mu and nu; plus 2 batch stats.
  assert len(differing) == 5 * 3 + 2
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4"]  # untouched


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_every_file_of_the_newest_checkpoint_truncated_or_deleted(four_steps, tmp_path, caplog):
  """Either the damage is detected (fallback to step 3, warning naming the problem) or the file
  was not needed and step 4 restores bit for bit; never wrong values."""
  _, intact = restore_latest(four_steps)
  step_dir = os.path.join(four_steps, "checkpoints", "4")
  files = sorted(os.path.relpath(p, step_dir) for p in glob.glob(f"{step_dir}/**", recursive=True)
                 if os.path.isfile(p))
  outcomes = {}
  for name in files:
    for damage in ("truncated", "deleted"):
      workdir = str(tmp_path / f"{len(outcomes)}")
      shutil.copytree(four_steps, workdir)
      target = os.path.join(workdir, "checkpoints", "4", name)
      _truncate(target) if damage == "truncated" else os.remove(target)
      caplog.clear()
      with caplog.at_level(logging.WARNING):
        step, state = restore_latest(workdir)
      if step == 4:
        assert_trees_equal(state, intact)
        outcomes[(name, damage)] = "not needed"
        continue
      assert step == 3, (name, damage)
      warning = " ".join(r.getMessage() for r in caplog.records)
      assert f"Checkpoint {workdir}/checkpoints/4 is damaged (" in warning
      assert f"Moved damaged checkpoint {workdir}/checkpoints/4 to {workdir}/checkpoints.damaged/4" in warning
      assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
      with open(os.path.join(workdir, "checkpoints.damaged", "4", "DAMAGED.txt")) as f:
        assert f.read().strip() in warning
      outcomes[(name, damage)] = "fell back"
  fell_back = {k for k, v in outcomes.items() if v == "fell back"}
  # The files that hold the values and their layout are always caught.
  for needed in ("state/_METADATA", "state/manifest.ocdbt", "data/process_0-of-1.json"):
    assert {(needed, "truncated"), (needed, "deleted")} <= fell_back
  data_files = [n for n in files if n.startswith("state/d/")]
  assert data_files and all((n, d) in fell_back for n in data_files for d in ("truncated", "deleted"))
  print(f"{len(outcomes)} damaged variants: {len(fell_back)} fell back, "
        f"{len(outcomes) - len(fell_back)} restored exactly")


def test_missing_file_is_named_in_the_warning(four_steps, tmp_path, caplog):
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  os.remove(os.path.join(workdir, "checkpoints", "4", "state", "manifest.ocdbt"))
  with caplog.at_level(logging.WARNING):
    step, _ = restore_latest(str(workdir))
  assert step == 3
  assert any(f"Checkpoint {workdir}/checkpoints/4 is damaged (missing state/manifest.ocdbt; "
             in r.getMessage() for r in caplog.records)


def test_damaged_newest_checkpoint_run_continues_from_the_previous_one(reference, four_steps,
                                                                         tmp_path):
  _, expected = reference
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "d", "*")):
    _truncate(path)
  resumed = run_tiny(workdir, num_train_steps=6)  # saves step 4 again: no collision
  assert_trees_equal(resumed, expected)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5", "6"]
  assert os.listdir(os.path.join(workdir, "checkpoints.damaged")) == ["4"]


def test_all_checkpoints_damaged_is_an_error_and_moves_nothing(four_steps, tmp_path):
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  for step in ("2", "3", "4"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
  with pytest.raises(checkpointing.DamagedCheckpointError) as error:
    run_tiny(workdir, num_train_steps=6)
  message = str(error.value)
  assert f"Every checkpoint in {workdir}/checkpoints is damaged" in message
  assert all(f"step {s}: missing state/_METADATA" in message for s in (2, 3, 4))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4"]


# ---------------------------------------------------------------------------------------------
# Non-finite values. Batches are in order (no shuffle): examples 2k-2, 2k-1 train step k.


def _all_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  checkpointer = checkpointing.Checkpointer(directory)
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


def test_checkpointer_refuses_to_save_non_finite_values(tmp_path):
  loop = tiny_loop(tmp_path, num_train_steps=1)
  state = loop.state.replace(params=jax.tree_util.tree_map(lambda x: x, loop.state.params))
  state = state.replace(params={**state.params, "hidden": {
      **state.params["hidden"], "bias": state.params["hidden"]["bias"].at[1].set(np.nan)}})
  checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints")
  with pytest.raises(FloatingPointError,
                     match=r"Refusing to save step 7: non-finite values in \['params/hidden/bias'\]"):
    checkpointer.save(7, state, loop.train_iterator)
  checkpointer.close()
  assert checkpointer.all_steps() == []
