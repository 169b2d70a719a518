"""Orbax checkpoints holding the train state and the Grain iterator state together.

Each saved step is one Orbax composite with items `state` (the TrainState pytree) and `data` (the
Grain iterator's state), written asynchronously. Orbax writes into a temporary folder and renames it
when complete, so a half-written checkpoint is never listed; a retired step is renamed out of the
listing (into `retired/`) before it is deleted, so a half-deleted one is never listed either. The
last `keep` steps are preserved, and also the best step on the validation metric when one is named.

On restore, a damaged checkpoint (missing or truncated file) is reported, moved to
`<folder>.damaged/`, and the next older one is used; a checkpoint of another model shape is refused
with the list of parameters that differ.
"""

import os
import shutil

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from affect_jax import processes


# Sub-folder of a checkpoint folder where Orbax moves the steps it retires, before they are deleted.
TRASH = "retired"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint whose parameters have other shapes than the configured model."""


class DamagedCheckpointError(RuntimeError):
  """No checkpoint of a folder that has some can be restored."""


# Files Orbax 0.12.8 (state item) and Grain (data item) need to restore a step, named in warnings.
_NEEDED_FILES = ("state/_METADATA", "state/manifest.ocdbt")


def describe_damage(step_dir, error):
  """What is wrong with a checkpoint that failed to restore: missing files, then the error."""
  missing = [name for name in _NEEDED_FILES if not os.path.exists(os.path.join(step_dir, name))]
  data_dir = os.path.join(step_dir, "data")
  if os.path.isdir(data_dir) and not any(n.endswith(".json") for n in os.listdir(data_dir)):
    missing.append("data/process_*.json")
  message = " ".join(str(error).split())
  if len(message) > 400:
    message = message[:400] + " ..."
  prefix = f"missing {', '.join(missing)}; " if missing else ""
  return f"{prefix}{type(error).__name__}: {message}"


class Checkpointer:
  """Saves and restores (state, data iterator) pairs in `directory`."""

  def __init__(self, directory, *, keep=3, best_metric=None, best_mode="max", async_save=True):
    self.directory = os.path.abspath(directory)
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    # Old steps are renamed into TRASH (atomic) instead of deleted in place: a process killed in the
    # middle of Orbax's recursive delete would leave a listed step that cannot be restored.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, todelete_subdir=TRASH)
    self._empty_trash()
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
    self._empty_trash()
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def _empty_trash(self):
    """Deletes the steps Orbax retired into TRASH (not a step name, so never listed or restored)."""
    trash = os.path.join(self.directory, TRASH)
    if jax.process_index() != 0 or not os.path.isdir(trash):
      return
    for name in os.listdir(trash):
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    self._empty_trash()

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores the newest complete checkpoint (or `step`); returns (step, state) or (None, None).

    A damaged checkpoint (a truncated or missing file) is reported with what was wrong, moved out of
    the way into `<directory>.damaged/` (so later saves of that step do not collide with it), and the
    next older one is tried. If every checkpoint is damaged, DamagedCheckpointError is raised and
    nothing is moved. A checkpoint whose parameter shapes differ from `abstract_state` is refused
    with IncompatibleCheckpointError naming the parameters.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    damaged = []
    for candidate in steps:
      where = os.path.join(self.directory, str(candidate))
      check_compatible(self.item_shapes(candidate), abstract_state, where)
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        problem = describe_damage(where, e)
        logging.warning("Checkpoint %s is damaged (%s); trying an older one.", where, problem)
        damaged.append((candidate, problem))
        continue
      for bad_step, problem in damaged:
        self._quarantine(bad_step, problem)
      logging.info("Restored checkpoint %s", where)
      return candidate, restored["state"]
    if damaged:
      raise DamagedCheckpointError(
          f"Every checkpoint in {self.directory} is damaged; none was moved or deleted:\n  "
          + "\n  ".join(f"step {s}: {p}" for s, p in damaged)
          + "\nMove or delete them to start this stage from the beginning.")
    return None, None

  def _quarantine(self, step, problem):
    """Moves a damaged step folder to `<directory>.damaged/<step>` with a note saying why."""
    if jax.process_index() == 0:
      destination_root = self.directory + ".damaged"
      os.makedirs(destination_root, exist_ok=True)
      destination = os.path.join(destination_root, str(step))
      suffix = 1
      while os.path.exists(destination):
        destination = os.path.join(destination_root, f"{step}.{suffix}")
        suffix += 1
      os.rename(os.path.join(self.directory, str(step)), destination)
      with open(os.path.join(destination, "DAMAGED.txt"), "w") as f:
        f.write(problem + "\n")
      logging.warning("Moved damaged checkpoint %s to %s", os.path.join(self.directory, str(step)),
                      destination)
    processes.wait_for_all(f"quarantined checkpoint {step}")
    self.manager.reload()

  def item_shapes(self, step):
    """{path: shape} of the saved `state` item, read from the checkpoint's metadata."""
    try:
      metadata = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return None  # unreadable metadata: restore() will report the damage
    if metadata is None:
      return None
    return _shapes(metadata)


def _key_name(key):
  for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def parameter_name(path):
  """'params/encoder/kernel': one spelling for a live TrainState and for Orbax's saved metadata.

  Orbax stores the state as nested dicts and lists (`opt_state/1/mu/...`) while the live state has
  attributes and tuples (`.opt_state[1].mu[...]`); jax.tree_util.keystr would spell them differently.
  """
  return "/".join(_key_name(k) for k in path)


def _shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {parameter_name(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


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


@jax.jit
def _leaves_finite(leaves):
  # One jitted reduction: its replicated result is readable on every host, whatever the sharding.
  return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])


def _assert_finite(state, step):
  """No NaN ever reaches a saved checkpoint."""
  flat = [(parameter_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  if not flat:
    return
  finite = np.asarray(_leaves_finite([x for _, x in flat]))
  bad = [name for (name, _), ok in zip(flat, finite) if not ok]
  if bad:
    raise FloatingPointError(f"Refusing to save step {step}: non-finite values in {bad[:5]}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def restore_params(directory, abstract_params=None):
  """The `state` pytree (params, batch stats, ...) of the newest restorable checkpoint in `directory`.

  Used to start a stage from the previous stage's result. A damaged newest checkpoint is reported
  and the next older one used (the folder belongs to the other stage, so nothing is moved). With
  `abstract_params`, a checkpoint whose shapes differ from it is refused (IncompatibleCheckpointError
  naming the parameters), never taken for a damaged one.
  """
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    steps = list(reversed(checkpointer.all_steps()))
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {directory}")
    damaged = []
    for step in steps:
      where = os.path.join(checkpointer.directory, str(step))
      if abstract_params is not None:
        # Other shapes are another configuration, not damage: refused before any restore is tried.
        check_compatible(checkpointer.item_shapes(step), abstract_params, where)
      try:
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_params)))
      except Exception as e:  # pylint: disable=broad-except
        problem = describe_damage(where, e)
        logging.warning("Checkpoint %s is damaged (%s); trying an older one.", where, problem)
        damaged.append(f"step {step}: {problem}")
        continue
      logging.info("Loaded %s step %d", directory, step)
      return restored["state"]
    raise DamagedCheckpointError(f"Every checkpoint in {directory} is damaged:\n  " + "\n  ".join(damaged))
  finally:
    checkpointer.close()
