r"""Figure 1: ViT-B/16 forward at 224x224 (feature extraction), ours vs transformers' ViTModel.

  python -m experiments.bench.vit_forward [--quick] [--batch=8] [--rounds=7] [--compile=true]

Contenders (float32, batch --batch, both on every core):
  ours            affect_jax VisionTransformer, jitted, parameters converted from the HF model
                  by affect_jax.tools.import_torch (same weights; the output difference is printed)
  torch eager     transformers ViTModel (no pooler), eval, torch.inference_mode
  torch.compile   the same model through torch.compile (inductor), when it works here
  matmul peak     a 2048^2 float32 jnp.dot: the machine's limit, timed in the same rounds; its
                  ratio (by GFLOP/s) is ours as a fraction of the peak
ViT-B/16 is counted as 35.1 GFLOP per 224^2 image (17.56 G multiply-adds), scaled for --quick.
--quick: the tiny preset at 64x64, patch 8, batch 2.
"""

from absl import app
from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from affect_jax.models import vit

BATCH = flags.DEFINE_integer("batch", 8, "Images per forward call.")
COMPILE = flags.DEFINE_bool("compile", True, "Also time torch.compile.")

VIT_B_GFLOP = 35.1  # per 224^2 image


def sizes():
  if harness.QUICK.value:
    return "tiny", 64, 8, 2
  return "B", 224, 16, BATCH.value


def vit_gflop(variant, image_size, patch_size):
  """GFLOP of one image's forward (2 x multiply-adds of the matmuls and attention)."""
  if (variant, image_size, patch_size) == ("B", 224, 16):
    return VIT_B_GFLOP
  s = vit.VIT_PRESETS[variant]
  d, depth, mlp = s["width"], s["depth"], s["mlp_dim"]
  tokens = (image_size // patch_size) ** 2 + 1
  per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
  patch = (tokens - 1) * patch_size * patch_size * 3 * d
  return 2 * (depth * per_block + patch) / 1e9


def jitted_forward(model_kwargs):
  """Our jitted ViT forward `(params, images) -> patch tokens`."""
  model = vit.VisionTransformer(**model_kwargs)
  return jax.jit(lambda p, x: model.apply({"params": p}, x)["patches"])


def ours_forward(params, model_kwargs, images):
  """A blocking call of our jitted ViT forward, and its output for the parity check."""
  forward = jitted_forward(model_kwargs)
  params = jax.device_put(params)
  images = jax.device_put(images)
  return lambda: jax.block_until_ready(forward(params, images))


def random_forward(variant, image_size, patch_size, batch):
  """(jitted forward, (random parameters, images)) of a preset, float32."""
  kwargs = dict(vit.VIT_PRESETS[variant], image_size=image_size, patch_size=patch_size)
  images = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  params = jax.jit(lambda: vit.VisionTransformer(**kwargs).init(jax.random.key(0), images[:1]))()
  return jitted_forward(kwargs), (jax.device_put(nn.unbox(params["params"])), jax.device_put(images))


def make_ours_random(variant, image_size, patch_size, batch):
  """Our forward with random parameters (for experiments/bench/flag_sweep.py)."""
  forward, args = random_forward(variant, image_size, patch_size, batch)
  return lambda: jax.block_until_ready(forward(*args))


def matmul_call(n=2048):
  """A blocking 2048^2 float32 matmul in JAX: (call, GFLOP per call)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return (lambda: jax.block_until_ready(dot(a, b))), 2 * n**3 / 1e9


def main(argv):
  del argv
  torch = harness.torch_threads()
  from experiments.bench import models_torch  # pylint: disable=g-import-not-at-top
  variant, image_size, patch_size, batch = sizes()
  torch_model = models_torch.hf_vit(variant, image_size, patch_size)
  params, model = models_torch.our_params(torch_model)
  model_kwargs = vit.vit_kwargs_from_config(import_config(model))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  images_nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  gflop = vit_gflop(variant, image_size, patch_size) * batch

  ours = ours_forward(params["encoder"], model_kwargs, images)
  with torch.inference_mode():
    reference = torch_model(pixel_values=images_nchw).last_hidden_state[:, 1:].numpy()
  diff = models_torch.max_abs_diff(ours(), reference)

  def torch_call(module):
    def call():
      with torch.inference_mode():
        return module(pixel_values=images_nchw).last_hidden_state
    return call

  def compiled():
    module = torch.compile(torch_model)
    call = torch_call(module)
    call()  # compiles here, so a failure drops only this contender
    return call

  matmul, matmul_gflop = matmul_call()
  contenders = [
      harness.Contender("ours (JAX, jit)", lambda: ours, batch, "images", gflop),
      harness.Contender("PyTorch eager (transformers ViTModel)", lambda: torch_call(torch_model),
                        batch, "images", gflop),
  ]
  if COMPILE.value:
    contenders.append(harness.Contender("torch.compile (inductor)", compiled, batch, "images", gflop))
  contenders.append(harness.Contender("matmul peak (jnp.dot 2048^2)", lambda: matmul, 1, "matmuls",
                                      matmul_gflop))
  rounds, warmup = harness.settings(5)
  harness.compare(
      "vit_forward", f"ViT-{variant}/{patch_size} forward at {image_size}x{image_size}", contenders,
      rounds=rounds, warmup=warmup,
      setting=f"batch {batch}, float32, {gflop / batch:.2f} GFLOP per image",
      notes=[f"same weights on both sides (converted by affect_jax.tools.import_torch): max |ours - "
             f"torch| over the patch tokens = {diff:.1e}",
             "the matmul-peak row's ratio is by GFLOP/s: ours as a fraction of the measured peak"],
      extra=dict(parity_max_abs_diff=diff, gflop_per_image=gflop / batch, batch=batch))


def import_config(model):
  from affect_jax.tools import import_torch  # pylint: disable=g-import-not-at-top
  return import_torch.model_config(model)


if __name__ == "__main__":
  app.run(main)
