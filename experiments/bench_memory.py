r"""Per-device memory of the full-size MAE pre-training step, compiled ahead of time on faked devices.

  python experiments/bench_memory.py [--cases=vit_b_2dev,vit_l_8dev] [--remat=none,encoder,all]
      [--dtype=bfloat16] [--compile=true] [--out=results.jsonl] [--global_batch=N]

(`--cases=vit_b_1dev --global_batch=8 --dtype=float32 --remat=none` is the step of
experiments/bench/mae_step.py, one device, for its compiled temporaries.)

Builds the paper's MAE config (configs/mae_pretrain.py:size=paper: ViT-B/16 encoder, 8-block
512-wide decoder, 75% masking, global batch 1024) or its ViT-L/16 variant, makes the train state
abstractly with `trainer.abstract_train_state` (ShapeDtypeStructs carrying their shardings; no
arrays), and lowers and compiles `trainer.make_train_step` for 2 or 8 faked CPU devices. The
compiled step's `memory_analysis()` gives per-device bytes: arguments (state + batch shard),
outputs, the outputs aliased to donated arguments, and temporaries (activations kept for the
backward pass, gradients, optimiser temporaries). Peak = arguments + outputs - aliased + temporaries.

Those are the CPU compiler's buffer assignments. Its scheduler does not delay rematerialised
recomputation to the backward pass, so on CPU remat does not lower the figure (a GPU's memory-aware
scheduler does). Hence a second, compiler-independent estimate from the program itself:

  state      parameters + Adam's two moments (float32), this device's shards, exactly
  gradients  float32, sharded like the parameters
  residuals  activations the backward pass keeps (the leaves of `jax.vjp`'s function, from
             jax.eval_shape), per sample times this device's share of the batch
  estimate   state + gradients + residuals + the image batch shard: a lower bound of the peak

Rematerialisation modes: none; encoder (`model.remat=True, model.decoder_remat=False`: each ViT
encoder block is recomputed in the backward pass); all (`model.remat=True`, which rematerialises
the MAE decoder blocks too: the model's default when remat is on).
A card "fits" when a figure is at most 95% of 24 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; JAX
preallocates 75% by default).
"""

import json
import os
import sys
import time

if "jax" not in sys.modules:  # faked devices must be requested before jax starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import mae as mae_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer
from configs import mae_pretrain

GIB = 2**30
CARD_BYTES = 24 * GIB
USABLE_FRACTION = 0.95

# name: (ViT variant, number of devices, mesh)
CASES = {
    "vit_b_1dev": ("B", 1, (("data", 1), ("fsdp", 1), ("model", 1))),
    "vit_b_2dev": ("B", 2, (("data", 2), ("fsdp", 1), ("model", 1))),
    "vit_l_8dev": ("L", 8, (("data", 8), ("fsdp", 1), ("model", 1))),
    "vit_l_8dev_fsdp": ("L", 8, (("data", 1), ("fsdp", 8), ("model", 1))),
}

_CASES = flags.DEFINE_list("cases", [c for c in CASES if c != "vit_b_1dev"], f"Which of {list(CASES)}.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "Global batch; 0 = the paper config's 1024.")
_REMAT = flags.DEFINE_list("remat", ["none", "encoder", "all"], "Rematerialisation modes.")
_DTYPE = flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes (float32, bfloat16).")
_COMPILE = flags.DEFINE_bool("compile", True, "Also compile (slow) for memory_analysis().")
_OUT = flags.DEFINE_string("out", "", "Append one JSON line per case to this file.")


def build(case, remat, dtype):
  """(config, model, optimiser, mesh) of one case."""
  variant, num_devices, mesh_axes = CASES[case]
  config = mae_pretrain.get_config("size=paper")
  config.dtype = dtype
  config.model.variant = variant
  config.model.remat = remat in ("encoder", "all")  # read by vit.vit_kwargs_from_config
  config.model.decoder_remat = remat == "all"  # read by mae.mae_from_config
  model = mae_lib.mae_from_config(config.model)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=1000)
  mesh = trainer.make_mesh(mesh_axes, jax.devices()[:num_devices])
  return config, model, tx, mesh


def residual_bytes_per_sample(model, image_size):
  """Bytes of activations kept for the backward pass per image (linear in the batch size)."""
  def loss(params, images):
    return model.apply({"params": params}, images, train=True,
                       rngs={"mask": jax.random.key(1), "dropout": jax.random.key(2)})["loss"]

  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                             jnp.zeros((1, image_size, image_size, 3))))["params"]

  def total(batch):
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(loss, p, x)[1], params, images)
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vjp_fn))

  # The parameters are residuals too, at any batch size: the difference leaves activations only.
  return (total(16) - total(8)) / 8


def shard_bytes(abstract):
  """Bytes of one device's shards of an abstract (sharded) tree."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(abstract))


def measure(case, remat, dtype, compile_step):
  """One case's per-device memory; returns a dict (GiB, seconds)."""
  config, model, tx, mesh = build(case, remat, dtype)
  batch_size, size = _GLOBAL_BATCH.value or config.optimizer.batch_size, config.model.image_size
  image = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  start = time.time()
  abstract, shardings, _ = trainer.abstract_train_state(
      model, tx, dict(images=image), jax.random.key(0), mesh)
  batch = {"image": jax.ShapeDtypeStruct(image.shape, image.dtype, sharding=trainer.batch_sharding(mesh))}
  local_batch = batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  state = shard_bytes(abstract)
  gradients = shard_bytes(abstract.params)
  residuals = residual_bytes_per_sample(model, size) * local_batch
  estimate = state + gradients + residuals + shard_bytes(batch)
  result = {
      "case": case, "variant": f"ViT-{CASES[case][0]}/16", "devices": len(mesh.devices.flat),
      "mesh": dict(mesh.shape), "dtype": dtype, "remat": remat, "global_batch": batch_size,
      "params_millions": round(sum(x.size for x in jax.tree_util.tree_leaves(abstract.params)) / 1e6, 1),
      "state_gib": round(state / GIB, 2), "gradients_gib": round(gradients / GIB, 2),
      "residuals_gib": round(residuals / GIB, 2), "estimate_gib": round(estimate / GIB, 2),
      "estimate_fits_24gb": estimate <= USABLE_FRACTION * CARD_BYTES,
  }
  if not compile_step:
    return result

  def loss_fn(params, batch_stats, batch, rngs):  # as in train/mae_pretrain.py
    out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
    return out["loss"], ({}, batch_stats)

  step = trainer.make_train_step(loss_fn, tx, shardings, mesh, config.seed)
  lowered = step.lower(abstract, batch)
  lowered_at = time.time()
  compiled = lowered.compile()
  compiled_at = time.time()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)
  result.update({
      "cpu_argument_gib": round(memory.argument_size_in_bytes / GIB, 2),
      "cpu_output_gib": round(memory.output_size_in_bytes / GIB, 2),
      "cpu_alias_gib": round(memory.alias_size_in_bytes / GIB, 2),
      "cpu_temp_gib": round(memory.temp_size_in_bytes / GIB, 2),
      "cpu_temp_mib": round(memory.temp_size_in_bytes / 2**20),
      "cpu_peak_gib": round(peak / GIB, 2),
      "cpu_peak_fits_24gb": peak <= USABLE_FRACTION * CARD_BYTES,
      "lower_s": round(lowered_at - start, 1), "compile_s": round(compiled_at - lowered_at, 1),
  })
  return result


def main(argv):
  del argv
  for case in _CASES.value:
    for dtype in _DTYPE.value:
      for remat in _REMAT.value:
        result = measure(case, remat, dtype, _COMPILE.value)
        line = json.dumps(result)
        print(line, flush=True)
        if _OUT.value:
          with open(_OUT.value, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
