"""AdamW with warm-up + cosine schedule, weight-decay mask and optional layer-wise lr decay."""

import re

import jax
import jax.numpy as jnp
import optax

_NO_DECAY = re.compile(r"(bias|scale|norm|pos_embed|posemb|cls|mask_token|prelu|alpha|_g$|weight_g)",
                       re.IGNORECASE)
_BLOCK = re.compile(r"blocks_(\d+)")


def learning_rate_schedule(opt_cfg, steps_per_epoch, total_steps=None):
  """Warm-up then cosine to 0 over `total_steps` (default: the configured epochs)."""
  total = max(1, int(total_steps or round(opt_cfg.epochs * steps_per_epoch)))
  warmup = min(int(round(opt_cfg.warmup_epochs * steps_per_epoch)), total - 1)
  if opt_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, opt_cfg.lr, max(warmup, 0), total, end_value=0.0)
  if opt_cfg.schedule == "constant":
    return optax.constant_schedule(opt_cfg.lr)
  raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}; expected 'cosine' or 'constant'")


def _path_name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params):
  """Weight decay on kernels and embeddings; none on biases, norms, position/CLS/mask tokens."""
  return jax.tree_util.tree_map_with_path(lambda p, _: not _NO_DECAY.search(_path_name(p)), params)


def layer_id(name, num_layers):
  """0 for the embeddings, i+1 for block i, num_layers+1 for everything after the blocks."""
  match = _BLOCK.search(name)
  if match:
    return int(match.group(1)) + 1
  if re.search(r"(patch_embed|embedding|pos_embed|posemb|cls)", name):
    return 0
  return num_layers + 1


def layer_scales(params, decay):
  """Per-parameter lr scale decay**(depth - layer), as in BEiT/MAE fine-tuning."""
  names = jax.tree_util.tree_map_with_path(lambda p, _: _path_name(p), params)
  blocks = [int(m.group(1)) for n in jax.tree_util.tree_leaves(names) for m in [_BLOCK.search(n)] if m]
  num_layers = max(blocks) + 1 if blocks else 0
  return jax.tree_util.tree_map(lambda n: decay ** (num_layers + 1 - layer_id(n, num_layers)), names)


def scale_by_layer_decay(decay):
  """Scales each update by its layer's factor; the factors are read off the parameter names."""

  def update_fn(updates, state, params=None):
    del params
    scales = layer_scales(updates, decay)
    return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def clip_by_global_norm(max_norm):
  """optax.clip_by_global_norm's clipping, reusing the norm when the caller passes it in.

  `tx.update(grads, state, params, grad_norm=n)` clips with `n`, the global norm the train step
  has already computed for its finiteness guard and its metric; without `grad_norm` it is
  computed here. optax's own transformation computes the norm again inside the step's update
  branch, where XLA cannot share it: the MAE ViT-B/16 step then reads every gradient three
  times for reductions instead of once (experiments/bench/RESULTS.md).
  """

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.global_norm(updates) if grad_norm is None else jnp.asarray(grad_norm)
    trigger = g_norm < max_norm

    def clip(t):
      return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)

    return jax.tree_util.tree_map(clip, updates), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(opt_cfg, steps_per_epoch, total_steps=None):
  """Returns (optax transformation, schedule)."""
  if opt_cfg.name != "adamw":
    raise ValueError(f"optimizer.name={opt_cfg.name!r}; only 'adamw' is supported")
  schedule = learning_rate_schedule(opt_cfg, steps_per_epoch, total_steps)
  parts = []
  if opt_cfg.grad_clip_norm:
    parts.append(clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2))
  parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask))
  if opt_cfg.layer_decay != 1.0:
    parts.append(scale_by_layer_decay(opt_cfg.layer_decay))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
