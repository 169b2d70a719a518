"""The trainer every stage shares: mesh, sharded state, jitted step, checkpoints, logging, the loop.

A stage supplies a model, a loss function and its data; the trainer owns everything else:

  mesh      from config.mesh as (axis, size) pairs, -1 = fill
  state     created sharded by a jitted init (never whole on one host first)
  step      one jitted update with explicit in/out shardings, the state donated, the step number
            folded into the RNG (streams 'dropout' and 'mask' are separate)
  loop      resumes from the stage's own checkpoint (state + Grain iterator), logs through CLU,
            evaluates, saves asynchronously, and saves then exits on SIGTERM
"""

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from affect_jax.models import partitioning
from affect_jax.train import checkpointing

# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM).
PREEMPTED_EXIT_CODE = 143


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any
  skipped_updates: jax.Array  # updates dropped because the loss or a gradient was not finite


def make_mesh(mesh_axes, devices=None):
  """Mesh from (axis, size) pairs; one size may be -1 to take the remaining devices.

  `devices` defaults to every device of every process. `jax.make_mesh` orders them by the
  accelerator topology (TPU slices); the axes are Auto so that Linen's logical constraints apply.
  """
  names = tuple(name for name, _ in mesh_axes)
  sizes = [int(size) for _, size in mesh_axes]
  devices = list(jax.devices() if devices is None else devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={mesh_axes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh={mesh_axes}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh={mesh_axes} needs {math.prod(sizes)} devices; there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh):
  """Leading (batch) dimension over the data axes (data and fsdp), everything else replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global_batch(local_batch, mesh):
  """Assembles a global jax.Array from each process's local numpy batch."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def compute_dtype(config):
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def abstract_train_state(model, tx, init_inputs, rng, mesh, *, params_override=None):
  """The train state's shapes and shardings, and the function that initialises it; no arrays made.

  Returns (abstract state of ShapeDtypeStructs carrying their shardings, state shardings, init_fn)
  where `init_fn(rng)` builds the state with logical-axis boxes still on the parameters.
  Shardings follow `partitioning.LOGICAL_AXIS_RULES`; a dimension its mesh axes do not divide
  (2 VA outputs over a 4-way 'model' axis) is replicated. The optimiser state inherits the
  parameters' logical names, so Adam's moments are sharded like the parameters.
  """
  input_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init_inputs)

  def init_fn(rng):
    # Dummy inputs are made inside the jitted init: never a whole global batch on one device.
    inputs = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), input_shapes)
    param_rng, dropout_rng, mask_rng = jax.random.split(rng, 3)
    variables = model.init({"params": param_rng, "dropout": dropout_rng, "mask": mask_rng},
                           train=False, **inputs)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if params_override is not None:
      params, batch_stats = params_override(params, batch_stats)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=batch_stats, skipped_updates=jnp.zeros((), jnp.int32))

  boxed = jax.eval_shape(init_fn, rng)
  shardings = partitioning.logical_shardings(mesh, boxed)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings)
  return abstract, shardings, init_fn


def create_train_state(model, tx, init_inputs, rng, mesh, *, params_override=None):
  """Initialises the model and optimiser directly into their shardings.

  `init_inputs` are keyword arguments of `model.init` (arrays or ShapeDtypeStructs with the
  global shapes). `params_override(params, batch_stats)` may replace part of the
  parameters (e.g. a pre-trained encoder) inside the jitted init.
  Returns (state, state_shardings).
  """
  _, shardings, init_fn = abstract_train_state(model, tx, init_inputs, rng, mesh,
                                               params_override=params_override)
  state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(loss_fn, tx, state_shardings, mesh, seed, compiler_options=None):
  """Jitted update. `loss_fn(params, batch_stats, batch, rngs) -> (loss, (metrics, batch_stats))`.

  `compiler_options`: XLA options for this compiled step only (e.g. the temporal stage's CPU
  kernel choice, `affect_jax.train.temporal.compiler_options`); None keeps XLA's defaults.

  A non-finite loss or gradient never changes the state: the update is dropped and counted in
  `skipped_updates`; the host decides whether to stop (config.on_nonfinite). The guard is a
  `lax.cond` around the optimiser update, not a select between old and new state: a select
  keeps the new parameters and optimiser moments alive beside the donated old ones (compiled
  MAE ViT-B/16 step at batch 8: 1868 MiB of temporaries with the select, 1639 with the cond,
  the same as no guard at all; experiments/bench/RESULTS.md).
  """
  base_rng = jax.random.key(seed)

  def step(state, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    rngs = {"dropout": jax.random.fold_in(rng, 0), "mask": jax.random.fold_in(rng, 1)}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # The models' nn.with_logical_constraint on activations (batch over data x fsdp) only binds
    # under a mesh and the rules; without them XLA alone would choose activation layouts.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
        partitioning.LOGICAL_AXIS_RULES):
      (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rngs)
    # One reduction over the gradients serves the guard, the metric and the clipping: a NaN or
    # infinity in any gradient (or a norm beyond float32's range) makes the norm non-finite.
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_update(operands):
      grads, grad_norm, params, opt_state, new_batch_stats, _ = operands
      # optimizer.clip_by_global_norm reuses grad_norm; transformations without extra arguments
      # ignore it.
      updates, opt_state = optax.with_extra_args_support(tx).update(
          grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state, new_batch_stats

    def skip_update(operands):
      _, _, params, opt_state, _, old_batch_stats = operands
      return params, opt_state, old_batch_stats

    params, opt_state, batch_stats = jax.lax.cond(
        finite, apply_update, skip_update,
        (grads, grad_norm, state.params, state.opt_state, batch_stats, state.batch_stats))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, finite=finite, grad_norm=grad_norm)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0,
                 compiler_options=compiler_options)


class Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      logging.warning("SIGTERM received: saving a checkpoint and exiting.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling the loop from a thread)
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def create_writer(workdir):
  """TensorBoard event files plus log lines on process 0; the others only log."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)


@dataclasses.dataclass
class Loop:
  """Everything the shared loop needs from a stage."""
  config: Any
  workdir: str                       # the stage's own folder
  state: TrainState
  train_step: Callable
  train_iterator: Any                # Grain iterator (checkpointable) yielding local numpy batches
  mesh: Any
  num_train_steps: int
  steps_per_epoch: int
  evaluate: Callable | None = None   # evaluate(state, step) -> dict of scalars (written by the loop)
  eval_every_steps: int = 0
  best_metric: str | None = None     # checkpoint kept as 'best' (max)
  schedule: Callable | None = None


def run_loop(loop: Loop, writer):
  """Trains to `num_train_steps`, resuming from the stage's own newest checkpoint.

  Returns (state, last evaluation metrics or {}).
  """
  config = loop.config
  ckpt = checkpointing.Checkpointer(os.path.join(loop.workdir, "checkpoints"),
                                    keep=config.keep_checkpoints, best_metric=loop.best_metric)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), loop.state)
  step, restored = ckpt.restore(abstract, loop.train_iterator)
  state = loop.state
  if restored is not None:
    state = restored
    logging.info("Resuming %s at step %d", config.stage, step)
  start = int(jax.device_get(state.step))
  if start == 0:
    writer.write_hparams(_flat_hparams(config))
  report = periodic_actions.ReportProgress(num_train_steps=loop.num_train_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  eval_metrics = {}
  train_metrics = []
  with Preemption() as preemption:
    step = start
    while step < loop.num_train_steps:
      batch = to_global_batch(next(loop.train_iterator), loop.mesh)
      state, metrics = loop.train_step(state, batch)
      step += 1
      metrics = jax.device_get(metrics)
      if not metrics["finite"]:
        if config.on_nonfinite == "stop":
          ckpt.close()
          raise FloatingPointError(
              f"Non-finite loss or gradient at step {step} of stage {config.stage} (loss={metrics['loss']}); "
              "the update was not applied and no checkpoint holds it. Set --config.on_nonfinite=skip "
              "to skip such updates instead.")
        logging.warning("Step %d: non-finite loss or gradient; update skipped.", step)
      train_metrics.append(metrics)
      report(step)
      if step % config.log_every_steps == 0 or step == loop.num_train_steps:
        summary = _mean_metrics(train_metrics)
        if loop.schedule is not None:
          summary["learning_rate"] = float(loop.schedule(step - 1))
        summary["epoch"] = step / max(loop.steps_per_epoch, 1)
        summary["skipped_updates"] = int(jax.device_get(state.skipped_updates))
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        train_metrics = []
      is_eval = loop.evaluate is not None and (
          (loop.eval_every_steps and step % loop.eval_every_steps == 0) or step == loop.num_train_steps)
      if is_eval:
        with report.timed("eval"):
          eval_metrics = loop.evaluate(state, step)
        writer.write_scalars(step, {f"val/{k}": v for k, v in eval_metrics.items()
                                    if np.isscalar(v)})
      # One reading of the flag for both decisions: a SIGTERM arriving between them (say, during
      # the flush) must not exit without saving this step; it is acted on after the next step.
      preempted = preemption.requested
      if preempted or is_eval or step % config.checkpoint_every_steps == 0 or (
          step == loop.num_train_steps):
        ckpt.save(step, state, loop.train_iterator,
                  metrics={k: float(v) for k, v in eval_metrics.items() if np.isscalar(v)} if is_eval else None)
      writer.flush()
      if preempted:
        ckpt.close()
        logging.warning("Saved step %d after SIGTERM; exiting with status %d.", step, PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)
  ckpt.close()
  return state, eval_metrics


def _mean_metrics(metrics_list):
  keys = [k for k in metrics_list[0] if k != "finite"]
  return {k: float(np.mean([m[k] for m in metrics_list])) for k in keys}


def _flat_hparams(config):
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (dict, flax.core.FrozenDict)) or hasattr(value, "items"):
        if key != "upstream":
          visit(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        flat[name] = value
      else:
        flat[name] = str(value)
  visit("", config)
  return flat


def checkpoint_dir(stage_workdir):
  return os.path.join(stage_workdir, "checkpoints")


def has_checkpoint(stage_workdir):
  directory = checkpoint_dir(stage_workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def upstream_checkpoint(config, workdir):
  """The checkpoint folder a stage starts from: `config.init_from`, else the upstream stage's
  folder in `workdir`, running the upstream stage first when it has no checkpoint yet."""
  from affect_jax import stages  # pylint: disable=g-import-not-at-top
  if config.init_from:
    directory = config.init_from
    if not has_checkpoint(directory) and has_checkpoint(os.path.dirname(directory.rstrip("/"))):
      directory = os.path.dirname(directory.rstrip("/"))
    if not has_checkpoint(directory):
      raise FileNotFoundError(f"config.init_from={config.init_from}: no checkpoint there")
    return checkpoint_dir(directory)
  upstream_dir = stages.stage_dir(workdir, config.upstream.stage)
  if not has_checkpoint(upstream_dir):
    logging.info("No %s checkpoint in %s yet: running that stage first.", config.upstream.stage,
                 upstream_dir)
    stages.run(config.upstream, workdir)
  return checkpoint_dir(upstream_dir)


def restore_upstream(config, directory, abstract):
  """`checkpointing.restore_params(directory, abstract)` of the upstream stage's checkpoint; one
  of other shapes is refused naming the parameters and the settings of `config.upstream` its
  run differed in (`stages.explain_incompatible`)."""
  from affect_jax import stages  # pylint: disable=g-import-not-at-top
  try:
    return checkpointing.restore_params(directory, abstract)
  except checkpointing.IncompatibleCheckpointError as e:
    raise stages.explain_incompatible(e, directory, config.upstream) from e
