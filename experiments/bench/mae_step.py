r"""Figure 2: one MAE pre-training step (forward, backward, AdamW), ours vs transformers' ViTMAE.

  python -m experiments.bench.mae_step [--quick] [--presets=B,tiny] [--batch_B=8] [--batch_tiny=64]

Contenders (float32, both on every core), per preset:
  ours           the MAE stage's own step, train/mae_pretrain.py's `make_train_step` (AdamW from
                 `optimizer.make_optimizer`: clipping at 1.0, decay mask, cosine schedule; state
                 donated; compiled with the stage's XLA options), on a one-device mesh
  PyTorch eager  transformers ViTMAEForPreTraining with the same sizes, torch.optim.AdamW with the
                 same betas, weight decay (same no-decay set) and gradient clipping at 1.0
Presets: B = configs/mae_pretrain.py:size=paper (ViT-B/16 at 224, decoder 8 x 512, 75 % masked,
norm_pix_loss) with drop_path 0 (HF ViTMAE has no stochastic depth); tiny = the tiny preset
(configs/common.py vit_config('tiny'): width 128, depth 4, 64x64 in patches of 8, decoder 2 x 64).
Both sides draw a fresh random mask every step. --quick: tiny at batch 8 only.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from affect_jax.models import mae as mae_lib
from affect_jax.train import mae_pretrain as mae_pretrain_stage
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer
from configs import mae_pretrain

PRESETS = flags.DEFINE_list("presets", ["B", "tiny"], "Which presets: B (paper ViT-B/16), tiny.")
BATCH_B = flags.DEFINE_integer("batch_B", 8, "Images per step at ViT-B/16.")
BATCH_TINY = flags.DEFINE_integer("batch_tiny", 64, "Images per step at the tiny preset (its config's).")

NO_DECAY = optimizer_lib.decay_mask  # ours; the torch side uses the same rule on its names


def preset_config(preset):
  """(config, batch) of a preset, as the MAE stage builds it."""
  config = mae_pretrain.get_config("size=paper" if preset == "B" else "size=tiny")
  config.model.drop_path = 0.0
  batch = BATCH_B.value if preset == "B" else BATCH_TINY.value
  if harness.QUICK.value:
    batch = 8
  return config, batch


def make_ours(config, batch):
  """(blocking call of our jitted MAE step, a function giving its GFLOP per call, parameter count);
  the state is carried from call to call."""
  model = mae_lib.mae_from_config(config.model)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=1000)
  mesh = trainer.make_mesh(config.mesh, jax.devices()[:1])
  size = config.model.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  state, shardings = trainer.create_train_state(
      model, tx, dict(images=jax.ShapeDtypeStruct(images.shape, jnp.float32)), jax.random.key(0), mesh)

  step = mae_pretrain_stage.make_train_step(model, tx, shardings, mesh, config.seed)
  device_batch = trainer.to_global_batch({"image": images}, mesh)
  holder = [state]
  count_gflop = lambda: harness.flops(step, holder[0], device_batch)  # asked only when needed

  def call():
    holder[0], metrics = step(holder[0], device_batch)
    return jax.block_until_ready(metrics["loss"])

  # the compiled program's text, for profile_mae_step (compiled again only when asked)
  call.compiled_text = lambda: step.lower(holder[0], device_batch).compile().as_text()
  count = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  return call, count_gflop, count


def make_torch(config, batch):
  import torch  # pylint: disable=g-import-not-at-top
  from experiments.bench import models_torch  # pylint: disable=g-import-not-at-top
  model = models_torch.hf_vit_mae(config.model)
  opt = config.optimizer
  names = {n: p for n, p in model.named_parameters()}
  decay = [p for n, p in names.items() if not optimizer_lib._NO_DECAY.search(n)]  # pylint: disable=protected-access
  no_decay = [p for n, p in names.items() if optimizer_lib._NO_DECAY.search(n)]  # pylint: disable=protected-access
  adamw = torch.optim.AdamW([dict(params=decay, weight_decay=opt.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=opt.lr, betas=(opt.b1, opt.b2))
  size = config.model.image_size
  images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))

  def call():
    adamw.zero_grad(set_to_none=True)
    loss = model(pixel_values=images).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
    adamw.step()
    return loss.item()

  return call, sum(p.numel() for p in model.parameters())


def main(argv):
  del argv
  harness.torch_threads()
  presets = ["tiny"] if harness.QUICK.value else PRESETS.value
  for preset in presets:
    config, batch = preset_config(preset)
    built = {}
    gflop = harness.StepGflop(built)

    def ours(config=config, batch=batch, built=built, gflop=gflop):
      call, gflop.count, built["ours_params"] = make_ours(config, batch)
      return call

    def torch_side(config=config, batch=batch, built=built):
      call, built["torch_params"] = make_torch(config, batch)
      return call

    cfg = config.model
    name = "ViT-B/16" if preset == "B" else f"tiny (width 128, depth 4, patch {cfg.patch_size})"
    contenders = [harness.Contender(f"ours (JAX) {preset}", ours, batch, "images", gflop, memory=True),
                  harness.Contender(f"PyTorch eager (ViTMAEForPreTraining) {preset}", torch_side, batch,
                                    "images", gflop, memory=True)]
    rounds, warmup = harness.settings(5 if preset == "B" else 11)
    summary = harness.compare(
        f"mae_step_{preset}", f"MAE pre-training step, {name} at {cfg.image_size}x{cfg.image_size}",
        contenders, rounds=rounds, warmup=warmup,
        setting=(f"batch {batch}, float32, mask ratio {cfg.mask_ratio}, decoder {cfg.decoder_depth} x "
                 f"{cfg.decoder_width}, norm_pix_loss {cfg.norm_pix_loss}, forward + backward + AdamW "
                 "(+ clipping at 1.0 both sides)"),
        notes=[lambda built=built: lambda_note(built)], extra=built)
    del summary


def lambda_note(built):
  return (f"parameters: ours {built.get('ours_params', 0) / 1e6:.2f} M, torch "
          f"{built.get('torch_params', 0) / 1e6:.2f} M (torch counts its fixed sin-cos tables as "
          f"parameters); XLA's count for our step: {built.get('gflop') or 0:.1f} GFLOP")


if __name__ == "__main__":
  app.run(main)
