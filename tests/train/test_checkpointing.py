"""The Checkpointer: parameter names, damaged checkpoints, incompatible configs, no NaN saved.

Checkpoints come from the shared trainer loop (`trainer.run_loop`) run in-process on a tiny
Dense -> BatchNorm -> Dense regressor (tests/conftest.py), so each case takes a second or two.
"""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from affect_jax.train import checkpointing
from conftest import (assert_trees_equal, run_tiny, step_folders, tiny_examples, tiny_iterator,
                      tiny_loop)


def abstract_of(state):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


_ABSTRACT = {}


def restore_latest(workdir):
  """(step, state as numpy) of the newest restorable checkpoint, read as the loop reads it."""
  if "state" not in _ABSTRACT:
    _ABSTRACT["state"] = abstract_of(tiny_loop(workdir, num_train_steps=1).state)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step, state = checkpointer.restore(_ABSTRACT["state"], tiny_iterator(tiny_examples()))
  finally:
    checkpointer.close()
  return step, jax.device_get(state)


def test_saved_names_match_the_live_state_and_resume_is_exact(tiny_reference, four_steps, tmp_path):
  # Orbax's metadata spells paths as dicts/lists ('opt_state/1/mu/...'), the live TrainState as
  # attributes/tuples; the compatibility check must see them as the same parameters.
  expected = tiny_reference
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
  assert step_folders(os.path.join(workdir, "checkpoints")) == ["2", "3", "4"]  # untouched


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
      assert step_folders(os.path.join(workdir, "checkpoints")) == ["2", "3"]
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


def test_all_checkpoints_damaged_is_an_error_and_moves_nothing(four_steps, tmp_path):
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  for step in ("2", "3", "4"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
  with pytest.raises(checkpointing.DamagedCheckpointError) as error:
    run_tiny(workdir, num_train_steps=6)
  message = str(error.value)
  assert f"Every checkpoint in {workdir}/checkpoints is damaged" in message
  assert all(f"step {s}: missing state/_METADATA" in message for s in (2, 3, 4))
  assert step_folders(os.path.join(workdir, "checkpoints")) == ["2", "3", "4"]


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


def test_upstream_restore_falls_back_and_leaves_the_folder_alone(four_steps, tmp_path, caplog):
  # restore_params is how a stage loads the previous stage's result (MAE -> fine-tuning -> features).
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  directory = os.path.join(workdir, "checkpoints")
  intact = jax.device_get(checkpointing.restore_params(directory))
  os.remove(os.path.join(directory, "4", "state", "_METADATA"))
  with caplog.at_level(logging.WARNING):
    fallback = jax.device_get(checkpointing.restore_params(directory))
  assert int(intact["step"]) == 4 and int(fallback["step"]) == 3
  assert any(f"Checkpoint {directory}/4 is damaged (missing state/_METADATA" in r.getMessage()
             for r in caplog.records)
  assert step_folders(directory) == ["2", "3", "4"]
  for step in ("2", "3"):
    os.remove(os.path.join(directory, step, "state", "_METADATA"))
  with pytest.raises(checkpointing.DamagedCheckpointError, match=f"Every checkpoint in {directory} is damaged"):
    checkpointing.restore_params(directory)


def test_upstream_restore_of_another_shape_is_a_mismatch_not_damage(four_steps, tmp_path, caplog):
  # A previous stage's checkpoint made with other settings (e.g. another head size) used to be
  # logged as "damaged" step by step; it is refused at once, naming the parameters, nothing moved.
  workdir = shutil.copytree(four_steps, tmp_path / "w")
  directory = os.path.join(workdir, "checkpoints")
  wider = abstract_of(tiny_loop(tmp_path / "wider", num_train_steps=1, width=5).state)
  with caplog.at_level(logging.WARNING), pytest.raises(checkpointing.IncompatibleCheckpointError) as error:
    checkpointing.restore_params(directory, wider)
  assert f"Checkpoint {directory}/4 does not fit this config" in str(error.value)
  assert "params/hidden/kernel: checkpoint (3, 4), config (3, 5)" in str(error.value)
  assert not any("damaged" in r.getMessage() for r in caplog.records)
  assert step_folders(directory) == ["2", "3", "4"] and not os.path.exists(directory + ".damaged")
  same = abstract_of(tiny_loop(tmp_path / "same", num_train_steps=1).state)
  assert int(jax.device_get(checkpointing.restore_params(directory, same).step)) == 4


def test_retired_steps_leave_the_listing_atomically(tmp_path, caplog):
  # Orbax deletes a retired step file by file; SIGKILL in the middle used to leave a listed step
  # without state/_METADATA. Retired steps are now renamed out of the listing first.
  with caplog.at_level(logging.INFO):
    run_tiny(tmp_path, num_train_steps=5)
  directory = os.path.join(tmp_path, "checkpoints")
  renamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Renamed step")]
  assert renamed == [f"Renamed step {s} to {directory}/{checkpointing.TRASH}/{s}" for s in (1, 2)]
  assert step_folders(directory) == ["3", "4", "5"]
  assert os.listdir(os.path.join(directory, checkpointing.TRASH)) == []  # emptied on close
  # A delete killed half-way leaves debris only inside the trash, which the next start empties.
  debris = os.path.join(directory, checkpointing.TRASH, "2", "state", "d")
  os.makedirs(debris)
  open(os.path.join(debris, "leftover"), "w").close()
  checkpointing.Checkpointer(directory).close()
  assert os.listdir(os.path.join(directory, checkpointing.TRASH)) == []
  assert step_folders(directory) == ["3", "4", "5"]
