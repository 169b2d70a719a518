r"""Figure 3: one training step of the temporal model, paper preset, ours vs the same layers in torch.nn.

  python -m experiments.bench.temporal_step [--quick] [--batch=32] [--window=300]

Contenders (float32, batch 32 x 300 frames x 768 features, both on every core):
  ours           the temporal stage's step, train/temporal.py's `make_train_step`: the
                 VA loss (1 - CCC) for configs/va.py:size=paper's model (TCN 768->256->128->128
                 at dilations 1, 2, 4 with weight norm and PReLU, 8 post-norm transformer layers of
                 512 with 4 heads and FF 512, dropout 0.3, BatchNorm head), AdamW with clipping
  PyTorch eager  experiments/bench/models_torch.TemporalModel (the same layers in torch.nn:
                 weight_norm Conv1d, nn.TransformerEncoder, BatchNorm1d over real frames) with
                 torch.optim.AdamW and clip_grad_norm_
Two of the 32 windows are shorter (tail windows: 180 and 240 real frames), as in training.
--quick: batch 4 x 60 frames.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness
from affect_jax.models import temporal as temporal_lib
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import tasks
from affect_jax.train import temporal as temporal_train
from affect_jax.train import trainer
from configs import va

BATCH = flags.DEFINE_integer("batch", 32, "Segments per step (paper: 32).")
WINDOW = flags.DEFINE_integer("window", 300, "Frames per segment (paper: 300).")
FEATURE_DIM = 768


def sizes():
  return (4, 60) if harness.QUICK.value else (BATCH.value, WINDOW.value)


def paper_config():
  return va.get_config("size=paper")


def synthetic_batch(batch, window, seed=0):
  """Features, frame mask and VA labels as the segment pipeline yields them."""
  rng = np.random.default_rng(seed)
  lengths = np.full(batch, window)
  lengths[:2] = (int(window * 0.6), int(window * 0.8))
  frame_mask = np.arange(window)[None] < lengths[:, None]
  return {"features": rng.normal(size=(batch, window, FEATURE_DIM)).astype(np.float32),
          "frame_mask": frame_mask,
          "va": rng.uniform(-1, 1, size=(batch, window, 2)).astype(np.float32),
          "va_valid": frame_mask & (rng.uniform(size=(batch, window)) < 0.9)}


def make_ours(config, batch_np, mesh=None):
  """(blocking step call, a function giving its GFLOP per step, parameter count) of our temporal
  stage's step."""
  task = tasks.TASKS["va"]
  model = temporal_lib.temporal_model_from_config(config.model, task.num_outputs)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=1000)
  mesh = mesh or trainer.make_mesh(config.mesh, jax.devices()[:1])
  init_inputs = dict(features=jax.ShapeDtypeStruct(batch_np["features"].shape, jnp.float32),
                     frame_mask=jax.ShapeDtypeStruct(batch_np["frame_mask"].shape, jnp.bool_))
  state, shardings = trainer.create_train_state(model, tx, init_inputs, jax.random.key(0), mesh)

  step = temporal_train.make_train_step(model, task, tx, shardings, mesh, config.seed)
  device_batch = trainer.to_global_batch(batch_np, mesh)
  holder = [state]
  count_gflop = lambda: harness.flops(step, holder[0], device_batch)  # asked only when needed

  def call():
    holder[0], metrics = step(holder[0], device_batch)
    return jax.block_until_ready(metrics["loss"])

  return call, count_gflop, sum(x.size for x in jax.tree_util.tree_leaves(state.params))


def make_torch(config, batch_np):
  import torch  # pylint: disable=g-import-not-at-top
  from experiments.bench import models_torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = models_torch.TemporalModel(config.model, FEATURE_DIM, 2).train()
  opt = config.optimizer
  named = dict(model.named_parameters())
  decay = [p for n, p in named.items() if not optimizer_lib._NO_DECAY.search(n)]  # pylint: disable=protected-access
  no_decay = [p for n, p in named.items() if optimizer_lib._NO_DECAY.search(n)]  # pylint: disable=protected-access
  adamw = torch.optim.AdamW([dict(params=decay, weight_decay=opt.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=opt.lr, betas=(opt.b1, opt.b2))
  batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch_np.items()}
  valid = batch["frame_mask"] & batch["va_valid"]

  def call():
    adamw.zero_grad(set_to_none=True)
    outputs = model(batch["features"], batch["frame_mask"])
    loss = models_torch.ccc_loss(outputs, batch["va"], valid)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
    adamw.step()
    return loss.item()

  return call, sum(p.numel() for p in model.parameters())


def main(argv):
  del argv
  harness.torch_threads()
  config = paper_config()
  batch, window = sizes()
  batch_np = synthetic_batch(batch, window)
  built = {}
  gflop = harness.StepGflop(built)

  def ours():
    call, gflop.count, built["ours_params"] = make_ours(config, batch_np)
    return call

  def torch_side():
    call, built["torch_params"] = make_torch(config, batch_np)
    return call

  contenders = [harness.Contender("ours (JAX)", ours, batch, "segments", gflop, memory=True),
                harness.Contender("PyTorch eager (torch.nn port)", torch_side, batch, "segments", gflop,
                                  memory=True)]
  rounds, warmup = harness.settings(5)
  harness.compare(
      "temporal_step", "Temporal model training step, paper preset", contenders, rounds=rounds,
      warmup=warmup,
      setting=(f"batch {batch} x {window} frames x {FEATURE_DIM} features, float32, dropout "
               f"{config.model.dropout}, forward + backward + AdamW (+ clipping at 1.0 both sides)"),
      notes=[lambda: (f"parameters: ours {built.get('ours_params', 0) / 1e6:.3f} M, torch "
                      f"{built.get('torch_params', 0) / 1e6:.3f} M (torch: one PReLU slope per "
                      f"activation as ours); XLA's count for our step: {built.get('gflop') or 0:.1f} GFLOP")],
      extra=built)


if __name__ == "__main__":
  app.run(main)
