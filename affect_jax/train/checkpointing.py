"""Orbax checkpoints holding the train state and the Grain iterator state together.

Each saved step is one Orbax composite with items `state` (the TrainState pytree) and `data` (the
Grain iterator's state), written asynchronously. Orbax writes into a temporary folder and renames it
when complete, so a half-written checkpoint is never listed. The last `keep` steps are preserved, and
also the best step on the validation metric when one is named.
"""

import os

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class IncompatibleCheckpointError(ValueError):
  """A checkpoint whose parameters have other shapes than the configured model."""


class Checkpointer:
  """Saves and restores (state, data iterator) pairs in `directory`."""

  def __init__(self, directory, *, keep=3, best_metric=None, best_mode="max", async_save=True):
    self.directory = os.path.abspath(directory)
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def best_step(self):
    return self.manager.best_step()

  def save(self, step, state, data_iterator=None, metrics=None):
    """Saves asynchronously; returns at once. The iterator must not advance before this call."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    _assert_finite(state, step)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores the newest complete checkpoint (or `step`); returns (step, state) or (None, None).

    A damaged newest checkpoint (a truncated or missing file) is reported and the next older one is
    tried. A checkpoint whose parameter shapes differ from `abstract_state` is refused.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    for candidate in steps:
      check_compatible(self.item_shapes(candidate), abstract_state,
                       os.path.join(self.directory, str(candidate)))
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("Checkpoint %s is damaged and was skipped (%s: %s); trying an older one.",
                        os.path.join(self.directory, str(candidate)), type(e).__name__, e)
        continue
      logging.info("Restored checkpoint %s", os.path.join(self.directory, str(candidate)))
      return candidate, restored["state"]
    if steps:
      logging.warning("No restorable checkpoint in %s", self.directory)
    return None, None

  def item_shapes(self, step):
    """{path: shape} of the saved `state` item, read from the checkpoint's metadata."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return None  # unreadable metadata: restore() will report the damage
    if metadata is None:
      return None
    return _shapes(metadata)


def _shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def check_compatible(saved_shapes, abstract_state, where):
  """Raises IncompatibleCheckpointError naming every parameter whose shape differs."""
  if saved_shapes is None:
    return
  expected = _shapes(abstract_state)
  differing = []
  for name, shape in expected.items():
    if name in saved_shapes and tuple(saved_shapes[name]) != tuple(shape):
      differing.append(f"{name}: checkpoint {tuple(saved_shapes[name])}, config {tuple(shape)}")
  missing = sorted(set(expected) - set(saved_shapes))
  unexpected = sorted(set(saved_shapes) - set(expected))
  if differing or missing or unexpected:
    lines = differing + [f"{n}: missing from checkpoint" for n in missing[:20]] + [
        f"{n}: not in this config's model" for n in unexpected[:20]]
    raise IncompatibleCheckpointError(
        f"Checkpoint {where} does not fit this config; parameters that differ:\n  " + "\n  ".join(lines))


def _assert_finite(state, step):
  """No NaN ever reaches a saved checkpoint."""
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
         if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating) and not bool(jax.numpy.isfinite(x).all())]
  if bad:
    raise FloatingPointError(f"Refusing to save step {step}: non-finite values in {bad[:5]}")


def restore_params(directory, abstract_params=None):
  """Restores only the parameters (and batch stats) of the newest checkpoint in `directory`.

  Used to start a stage from the previous stage's result. Returns the raw pytree of `state`.
  """
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}")
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_params)))
    logging.info("Loaded %s step %d", directory, step)
    return restored["state"]
  finally:
    checkpointer.close()
