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
# Unoptimised CPU code generation halves compile time, which is most of this test's time.
WORKER_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true")


def _spec(sharding):
  return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def _run(kind, mesh_sizes, devices, with_gradient=False):
  """Three steps of `kind` ('mae' | 'temporal') on a mesh.

  Returns (losses, final params and batch stats, parameter specs, whether each parameter is
  replicated, and with `with_gradient` the gradient at the initial parameters, else None).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from affect_jax.models import mae as mae_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.models import temporal as temporal_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import mae_pretrain as mae_stage  # pylint: disable=g-import-not-at-top
  from affect_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import tasks  # pylint: disable=g-import-not-at-top
  from affect_jax.train import temporal as temporal_train  # pylint: disable=g-import-not-at-top
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import mae_pretrain, va  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  if kind == "mae":
    config = mae_pretrain.get_config("size=smoke")
    model = mae_lib.mae_from_config(config.model)
    size = config.model.image_size
    batch = {"image": rng.normal(size=(config.optimizer.batch_size, size, size, 3)).astype(np.float32)}
    init_inputs = dict(images=jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32))

    loss_fn = mae_stage.make_loss_fn(model)
    options = mae_stage.compiler_options()
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
    loss_fn = temporal_train.make_loss_fn(model, tasks.TASKS["va"])
    options = temporal_train.compiler_options()

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
  gradient = None
  if with_gradient:
    rngs = {"dropout": jax.random.key(1), "mask": jax.random.key(2)}
    gradient = jax.device_get(jax.jit(jax.grad(lambda p: loss_fn(p, state.batch_stats, batch, rngs)[0]))(
        state.params))
  # Each stage's step is compiled with its own XLA options (as the stages build it).
  step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed, compiler_options=options)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, trainer.to_global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  replicated = [x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(state.params)]
  final = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  return losses, final, param_specs, replicated, gradient


def _small_dims_specs():
  """Specs of the VA model on an 8-way 'model' axis, from shapes only (nothing compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from affect_jax.models import temporal as temporal_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import va  # pylint: disable=g-import-not-at-top

  config = va.get_config("size=smoke")
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=2)
  mesh = trainer.make_mesh((("data", 1), ("fsdp", 1), ("model", 8)))
  abstract, _, _ = trainer.abstract_train_state(
      temporal_lib.temporal_model_from_config(config.model, 2), tx,
      dict(features=jax.ShapeDtypeStruct((8, 30, 32), jnp.float32),
           frame_mask=jax.ShapeDtypeStruct((8, 30), jnp.bool_)), jax.random.key(0), mesh)
  params = abstract.params
  return {"head_out.kernel": _spec(params["head_out"]["kernel"].sharding),
          "head_out.bias": _spec(params["head_out"]["bias"].sharding),
          "head_hidden.kernel": _spec(params["head_hidden"]["kernel"].sharding)}


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def worker(write_expected):
  """Runs in the subprocess with 8 faked devices; prints one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  result = {"specs": {}, "max_param_diff": {}, "losses": {}, "reference_losses": {}, "seconds": {},
            "replicated_params": {}, "small_dims": _small_dims_specs(), "no_gradient": {}}
  for kind in ("mae", "temporal"):
    start = time.time()
    ref_losses, ref_final, _, _, gradient = _run(kind, (1, 1, 1), jax.devices()[:1], with_gradient=True)
    result["reference_losses"][kind] = ref_losses
    # Parameters the loss does not depend on in exact arithmetic get rounding-noise gradients,
    # which Adam scales up to steps of about the learning rate whatever their size: they cannot
    # agree to 1e-5 between any two summation orders, so they are listed and left out.
    no_gradient = sorted(f"['params']{k}" for k, g in _leaves(gradient).items() if np.max(np.abs(g)) < 1e-7)
    # The BatchNorm running mean absorbs the bias just before it (one of those parameters).
    skipped = set(no_gradient) | {k for k in _leaves(ref_final) if k.endswith("['mean']")}
    result["no_gradient"][kind] = no_gradient
    result["specs"][kind] = {}
    reference = _leaves(ref_final)
    for sizes in MESHES:
      name = ",".join(map(str, sizes))
      losses, final, specs, replicated, _ = _run(kind, sizes, None)
      result["specs"][kind][name] = specs
      result["replicated_params"][f"{kind} {name}"] = all(replicated)
      result["losses"][f"{kind} {name}"] = losses
      result["max_param_diff"][f"{kind} {name}"] = max(
          float(np.max(np.abs(x - reference[k]))) for k, x in _leaves(final).items() if k not in skipped)
    result["seconds"][kind] = round(time.time() - start, 1)
  if write_expected:
    with open(EXPECTED_SPECS, "w") as f:
      json.dump(result["specs"], f, indent=1, sort_keys=True)
      f.write("\n")
  print("RESULT" + json.dumps(result))


def run_worker():
  env = dict(os.environ, XLA_FLAGS=WORKER_XLA_FLAGS, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_meshes_match_one_device_and_the_partition_table():
  result = run_worker()
  print(json.dumps({k: result[k] for k in ("max_param_diff", "losses", "seconds")}, indent=1))
  for kind in ("mae", "temporal"):
    reference = np.asarray(result["reference_losses"][kind])
    assert np.all(np.isfinite(reference)) and len(set(reference.tolist())) == NUM_STEPS  # it trains
    for sizes in MESHES:
      name = f"{kind} {','.join(map(str, sizes))}"
      np.testing.assert_allclose(result["losses"][name], reference, rtol=TOLERANCE, atol=TOLERANCE,
                                 err_msg=name)
      assert result["max_param_diff"][name] <= TOLERANCE, (name, result["max_param_diff"][name])
  # Only the known invariances are left out: a key bias shifts every attention logit of a query
  # equally (softmax ignores it); the BatchNorm head subtracts any constant added before it.
  assert result["no_gradient"] == {
      "mae": [f"['params']['{block}']['attn']['key']['bias']" for block in (
          "decoder_blocks_0", "decoder_blocks_1")] + [
              f"['params']['encoder']['blocks_{i}']['attn']['key']['bias']" for i in (0, 1)],
      "temporal": ["['params']['head_hidden']['bias']",
                   "['params']['transformer']['layers_0']['attn']['key']['bias']",
                   "['params']['transformer']['layers_0']['norm2']['bias']"]}
  with open(EXPECTED_SPECS) as f:
    expected = json.load(f)
  assert result["specs"] == expected
  # Spot checks of the table against LOGICAL_AXIS_RULES (embed -> fsdp, mlp/heads/classes -> model).
  mae_222, temporal_241 = result["specs"]["mae"]["2,2,2"], result["specs"]["temporal"]["2,4,1"]
  assert mae_222["['encoder']['blocks_0']['mlp']['fc1']['kernel']"] == ["fsdp", "model"]
  assert mae_222["['encoder']['blocks_1']['attn']['proj']['kernel']"] == ["model", "fsdp"]
  assert mae_222["['encoder']['patch_embed']['kernel']"] == [None, None, None, "fsdp"]
  assert mae_222["['decoder_pred']['kernel']"] == ["fsdp", None]
  assert temporal_241["['head_hidden']['kernel']"] == ["fsdp", "model"]
  assert temporal_241["['head_out']['kernel']"] == ["model", None]  # mlp and classes share 'model'
  assert temporal_241["['input_proj']['kernel']"] == [None, "fsdp"]
  # (8,1,1) is pure data parallelism: every parameter whole on every device.
  assert result["replicated_params"] == {"mae 8,1,1": True, "mae 2,4,1": False, "mae 2,2,2": False,
                                         "temporal 8,1,1": True, "temporal 2,4,1": False,
                                         "temporal 2,2,2": False}
  # On an 8-way 'model' axis the 2 VA outputs cannot split: replicated instead of an error.
  assert result["small_dims"] == {"head_out.kernel": ["model", None], "head_out.bias": [None],
                                  "head_hidden.kernel": ["fsdp", "model"]}


def finetune_init_worker(directory):
  """Runs in the subprocess: the fine-tuning state made from a MAE checkpoint on sharded meshes.

  A smoke MAE state is made and saved on the mesh (8,1,1); `mae_finetune.restore_mae_encoder`
  restores its encoder into the (2,4,1) mesh (FSDP: parameters split over 4 devices) and
  `create_state_from_mae` copies it into the classifier inside the jitted init. The classifier
  learns its position embedding, which starts from the MAE's sin-cos table.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from affect_jax.models import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.models import mae as mae_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.models import vit  # pylint: disable=g-import-not-at-top
  from affect_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from affect_jax.train import mae_finetune  # pylint: disable=g-import-not-at-top
  from affect_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import mae_finetune as finetune_config  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  config = finetune_config.get_config("size=smoke")
  config.model.posemb = "learn"
  size = config.model.image_size
  images = dict(images=jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32))
  mae = mae_lib.mae_from_config(config.upstream.model)
  mae_tx, _ = optimizer_lib.make_optimizer(config.upstream.optimizer, steps_per_epoch=1)
  mae_mesh = trainer.make_mesh((("data", 8), ("fsdp", 1), ("model", 1)))
  mae_state, _ = trainer.create_train_state(mae, mae_tx, images, jax.random.key(3), mae_mesh)
  checkpointer = checkpointing.Checkpointer(directory, async_save=False)
  checkpointer.save(1, mae_state)
  checkpointer.close()

  mesh = trainer.make_mesh((("data", 2), ("fsdp", 4), ("model", 1)))
  model = classifier_lib.classifier_from_config(config.model, mae_finetune.head_size(("expr",)))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=1)
  encoder = mae_finetune.restore_mae_encoder(config, directory, mesh, 8)
  state, shardings = mae_finetune.create_state_from_mae(model, tx, images, jax.random.key(5), mesh,
                                                        encoder)
  scratch, _ = trainer.create_train_state(model, tx, images, jax.random.key(5), mesh)

  result = {"encoder_mismatch": [], "sharding_mismatch": [], "other_mismatch": []}
  mae_encoder = _leaves(jax.device_get(mae_state.params["encoder"]))
  table = vit.sincos_2d_posemb(model.encoder.width, model.encoder.grid_size)
  mae_encoder["['pos_embed']"] = np.asarray(table, np.float64)
  for name, value in _leaves(jax.device_get(state.params["encoder"])).items():
    if not np.array_equal(value, mae_encoder.pop(name)):
      result["encoder_mismatch"].append(name)
  result["encoder_mismatch"] += sorted(mae_encoder)  # MAE parameters the classifier did not get
  # Head and optimiser state are the scratch init's (same rng); Adam's moments start at zero.
  fresh = _leaves(jax.device_get({"head": scratch.params["head"], "opt_state": scratch.opt_state}))
  for name, value in _leaves(jax.device_get({"head": state.params["head"],
                                             "opt_state": state.opt_state})).items():
    if not np.array_equal(value, fresh[name]):
      result["other_mismatch"].append(name)
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    expected = _tree_get(shardings, path)
    if not x.sharding.is_equivalent_to(expected, x.ndim):
      result["sharding_mismatch"].append(jax.tree_util.keystr(path))
  kernel = state.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  result["fc1_spec"] = _spec(kernel.sharding)
  result["fc1_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  result["num_encoder_leaves"] = len(nn.unbox(jax.tree_util.tree_leaves(state.params["encoder"])))
  print("RESULT" + json.dumps(result))


def _tree_get(tree, path):
  for key in path:
    tree = tree[key.key] if hasattr(key, "key") else (
        getattr(tree, key.name) if hasattr(key, "name") else tree[key.idx])
  return tree


def test_finetune_state_starts_from_the_mae_encoder_restored_sharded(tmp_path):
  env = dict(os.environ, XLA_FLAGS=WORKER_XLA_FLAGS, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--finetune-worker",
                         str(tmp_path / "mae_checkpoints")], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-6000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  # Every encoder parameter equals the MAE's exactly (pos_embed: the MAE's sin-cos table).
  assert result["encoder_mismatch"] == [] and result["num_encoder_leaves"] > 10, result
  assert result["other_mismatch"] == [], result
  assert result["sharding_mismatch"] == [], result
  assert result["fc1_spec"] == ["fsdp", "model"] and result["fc1_shard_shape"] == [8, 64]  # 32 / 4


if __name__ == "__main__":
  if "--finetune-worker" in sys.argv:
    finetune_init_worker(sys.argv[sys.argv.index("--finetune-worker") + 1])
  elif "--worker" in sys.argv or "--write-expected" in sys.argv:
    if "--write-expected" in sys.argv and "--worker" not in sys.argv:
      os.environ["XLA_FLAGS"] = WORKER_XLA_FLAGS
      os.environ["JAX_PLATFORMS"] = "cpu"
    worker(write_expected="--write-expected" in sys.argv)
