"""Sharded training equals one-device training, and parameters land where the rules say.

The test runs this file as a script in a subprocess that fakes 8 CPU devices (XLA_FLAGS must be
set before jax starts). For the meshes (data, fsdp, model) = (8,1,1), (2,4,1), (2,2,2) the script
builds the smoke MAE and the smoke temporal model (with the paper's BatchNorm head, so batch
statistics are covered) through `trainer.create_train_state` / `make_train_step`, takes three
steps on fixed synthetic batches, and compares losses and parameters with a one-device mesh.

  python tests/train/test_sharding.py --write-expected   # regenerates expected_partition_specs.json
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected_partition_specs.json")
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
NUM_STEPS = 3
TOLERANCE = 1e-5


def _spec(sharding):
  return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def _run(kind, mesh_sizes, devices):
  """Three steps of `kind` ('mae' | 'temporal') on a mesh; returns losses, params, specs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from affect_jax.models import mae as mae_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.models import temporal as temporal_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import tasks  # pylint: disable=g-import-not-at-top
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import mae_pretrain, va  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  if kind == "mae":
    config = mae_pretrain.get_config("size=smoke")
    model = mae_lib.mae_from_config(config.model)
    size = config.model.image_size
    batch = {"image": rng.normal(size=(config.optimizer.batch_size, size, size, 3)).astype(np.float32)}
    init_inputs = dict(images=jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32))

    def loss_fn(params, batch_stats, batch, rngs):  # as in train/mae_pretrain.py
      out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
      return out["loss"], ({}, batch_stats)
  else:
    config = va.get_config("size=smoke")
    config.model.head_norm = "batch"  # the paper's head: batch statistics must reduce globally
    model = temporal_lib.temporal_model_from_config(config.model, 2)
    batch_size, window, dim = 8, config.window, 32
    lengths = np.array([30, 30, 17, 30, 5, 30, 24, 30])
    frame_mask = np.arange(window)[None] < lengths[:, None]
    batch = {"features": rng.normal(size=(batch_size, window, dim)).astype(np.float32),
             "frame_mask": frame_mask,
             "va": rng.uniform(-1, 1, size=(batch_size, window, 2)).astype(np.float32),
             "va_valid": frame_mask & (rng.uniform(size=(batch_size, window)) < 0.8)}
    init_inputs = dict(features=jax.ShapeDtypeStruct(batch["features"].shape, jnp.float32),
                       frame_mask=jax.ShapeDtypeStruct(frame_mask.shape, jnp.bool_))
    task = tasks.TASKS["va"]

    def loss_fn(params, batch_stats, batch, rngs):  # as in train/temporal.py
      outputs, mutated = model.apply({"params": params, "batch_stats": batch_stats}, batch["features"],
                                     batch["frame_mask"], train=True, rngs=rngs, mutable=["batch_stats"])
      return task.loss(outputs, batch, task.valid(batch)), ({}, mutated["batch_stats"])

  # Two steps per epoch: the warm-up gives learning rates 0, lr/2, lr for the temporal model.
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=2)
  mesh = trainer.make_mesh(tuple(zip(("data", "fsdp", "model"), mesh_sizes)), devices)
  state, shardings = trainer.create_train_state(model, tx, init_inputs, jax.random.key(config.seed), mesh)
  # The arrays the jitted init made carry the shardings it was asked for.
  made = jax.tree_util.tree_map(lambda x: x.sharding, state)
  assert all(a.is_equivalent_to(b, len(x.shape)) for a, b, x in zip(
      jax.tree_util.tree_leaves(made), jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(state)))
  param_specs = {jax.tree_util.keystr(p): _spec(x.sharding)
                 for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for moment in ("mu", "nu"):  # Adam's moments are sharded like the parameters
    tree = optax.tree_utils.tree_get(state.opt_state, moment)
    specs = {jax.tree_util.keystr(p): _spec(x.sharding) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert specs == param_specs, moment
  step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, trainer.to_global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  final = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  return losses, final, param_specs


def worker(write_expected):
  """Runs in the subprocess with 8 faked devices; prints one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  result = {"specs": {}, "max_param_diff": {}, "losses": {}, "reference_losses": {}, "seconds": {}}
  for kind in ("mae", "temporal"):
    start = time.time()
    ref_losses, ref_final, _ = _run(kind, (1, 1, 1), jax.devices()[:1])
    result["reference_losses"][kind] = ref_losses
    result["specs"][kind] = {}
    for sizes in MESHES:
      name = ",".join(map(str, sizes))
      losses, final, specs = _run(kind, sizes, None)
      result["specs"][kind][name] = specs
      result["losses"][f"{kind} {name}"] = losses
      result["max_param_diff"][f"{kind} {name}"] = max(
          float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
          for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(ref_final)))
    result["seconds"][kind] = round(time.time() - start, 1)
  if write_expected:
    with open(EXPECTED_SPECS, "w") as f:
      json.dump(result["specs"], f, indent=1, sort_keys=True)
      f.write("\n")
  print("RESULT" + json.dumps(result))


def run_worker():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_meshes_match_one_device_and_the_partition_table():
  result = run_worker()
  print(json.dumps({k: result[k] for k in ("max_param_diff", "seconds")}, indent=1))
  for kind in ("mae", "temporal"):
    reference = np.asarray(result["reference_losses"][kind])
    assert np.all(np.isfinite(reference)) and len(set(reference.tolist())) == NUM_STEPS  # it trains
    for sizes in MESHES:
      name = f"{kind} {','.join(map(str, sizes))}"
      np.testing.assert_allclose(result["losses"][name], reference, rtol=TOLERANCE, atol=TOLERANCE,
                                 err_msg=name)
      assert result["max_param_diff"][name] <= TOLERANCE, (name, result["max_param_diff"][name])
  with open(EXPECTED_SPECS) as f:
    expected = json.load(f)
  assert result["specs"] == expected
  # Spot checks of the table against LOGICAL_AXIS_RULES (embed -> fsdp, mlp/heads/classes -> model).
  mae_222, temporal_241 = result["specs"]["mae"]["2,2,2"], result["specs"]["temporal"]["2,4,1"]
  assert mae_222["['encoder']['blocks_0']['mlp']['fc1']['kernel']"] == ["fsdp", "model"]
  assert mae_222["['encoder']['blocks_1']['attn']['proj']['kernel']"] == ["model", "fsdp"]
  assert mae_222["['encoder']['patch_embed']['kernel']"] == [None, None, None, "fsdp"]
  assert mae_222["['decoder_pred']['kernel']"] == ["fsdp", None]
  assert all(s in ([], [None], [None, None], [None, None, None], [None, None, None, None])
             for s in result["specs"]["mae"]["8,1,1"].values())  # pure data parallelism
  # 2 VA outputs do not split 4 ways: replicated instead of an error.
  assert temporal_241["['head_out']['kernel']"] == ["fsdp", None]
  assert temporal_241["['head_out']['bias']"] == [None]
  assert temporal_241["['head_hidden']['kernel']"] == ["fsdp", "model"]


if __name__ == "__main__":
  if "--worker" in sys.argv or "--write-expected" in sys.argv:
    if "--write-expected" in sys.argv and "--worker" not in sys.argv:
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      os.environ["JAX_PLATFORMS"] = "cpu"
    worker(write_expected="--write-expected" in sys.argv)
