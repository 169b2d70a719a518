"""Masked autoencoder (He et al. 2022) with the math of the official MAE / HF ViTMAE.

Parameter tree::

    encoder/...                     the VisionTransformer tree (shared with FrameClassifier)
    decoder_embed, mask_token [Dd], decoder_blocks_i/..., decoder_norm, decoder_pred

Both position embeddings of the official MAE are fixed 2-D sin-cos tables with a
zero CLS row; they are constants here, not parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax.models import partitioning as P
from affect_jax.models import vit

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """``[B, H, W, C]`` -> ``[B, N, p*p*C]`` in the official MAE order ('nchpwq->nhwpqc')."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'image size {h}x{w} is not a multiple of patch_size {p}')
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # b, gh, gw, p, q, c
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Inverse of :func:`patchify` for square images: ``[B, N, p*p*C]`` -> ``[B, H, W, C]``."""
  b, n, _ = patches.shape
  p = patch_size
  g = int(round(n**0.5))
  if g * g != n:
    raise ValueError(f'unpatchify needs a square number of patches, got {n}')
  x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


def patch_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
  """Reconstruction targets ``[B, N, p*p*C]``; per-patch normalised for norm_pix_loss.

  The variance is the unbiased one (``torch.Tensor.var`` default), as in MAE.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
  return target


def mae_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool = False) -> jax.Array:
  """MSE per patch (mean over its pixels), averaged over masked patches only.

  Args:
    images: ``[B, H, W, C]``.
    pred: ``[B, N, p*p*C]`` decoder output.
    mask: ``[B, N]``, 1 = masked (counted), 0 = visible (ignored).
  """
  target = patch_targets(images, patch_size, norm_pix_loss)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = mask.astype(jnp.float32)
  # max(., 1): with nothing masked (mask_ratio 0) the loss is 0, not NaN.
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def random_masking(tokens: jax.Array, noise: jax.Array, mask_ratio: float):
  """Per-sample shuffle by ``argsort(noise)``; keeps the first ``int(N * (1 - mask_ratio))``.

  Returns:
    (visible tokens [B, len_keep, D], mask [B, N] float 1=masked, ids_restore [B, N] int32).
  """
  _, n, _ = tokens.shape
  if noise.shape != tokens.shape[:2]:
    raise ValueError(f'noise must have shape {tokens.shape[:2]}, got {noise.shape}')
  len_keep = int(n * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :len_keep]
  visible = jnp.take_along_axis(tokens, ids_keep[:, :, None], axis=1)
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return visible, mask, ids_restore


class MaskedAutoencoder(nn.Module):
  """MAE for pre-training. ``__call__`` returns dict(loss, pred, mask, ids_restore).

  Attributes:
    encoder: the :class:`vit.VisionTransformer` (official MAE: posemb='sincos2d').
    mask_ratio: fraction of patches hidden from the encoder.
    decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: decoder sizes
      (official: 512, 8, 16, 4 * 512).
    norm_pix_loss: regress per-patch normalised pixels.
    dtype: compute dtype of the decoder (the encoder has its own).
    decoder_remat: rematerialise each decoder block in the backward pass; None
      (default) follows the encoder's ``remat``. At the paper's size most of the
      activations kept for the backward pass are the decoder's (197 tokens x 8
      blocks), so encoder-only remat saves little (experiments/RESULTS_scale.md).

  The masking noise comes from the 'mask' RNG stream unless ``noise`` [B, N] is
  given (HF ViTMAEForPreTraining's ``noise`` argument, for parity tests).
  """

  encoder: vit.VisionTransformer
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  norm_pix_loss: bool = False
  dtype: Any = jnp.float32
  decoder_remat: bool | None = None

  def setup(self):
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f'mask_ratio must be in [0, 1), got {self.mask_ratio}')
    self.decoder_embed = vit.dense(self.decoder_width, (P.CHANNELS_IN, P.EMBED), self.dtype, 'decoder_embed')
    self.mask_token = self.param(
        'mask_token', vit.partitioned(nn.initializers.normal(0.02), (P.EMBED,)),
        (self.decoder_width,), jnp.float32)
    remat = self.encoder.remat if self.decoder_remat is None else self.decoder_remat
    block_cls = nn.remat(vit.Block, static_argnums=(2,)) if remat else vit.Block  # as the encoder's
    self.decoder_blocks = [
        block_cls(self.decoder_heads, self.decoder_mlp_dim,
                  layer_norm_eps=self.encoder.layer_norm_eps, dtype=self.dtype)
        for _ in range(self.decoder_depth)
    ]
    self.decoder_norm = vit.layer_norm(self.encoder.layer_norm_eps, self.dtype, 'decoder_norm')
    patch_pixels = self.encoder.patch_size**2 * 3
    self.decoder_pred = vit.dense(patch_pixels, (P.EMBED, P.PIXELS), self.dtype, 'decoder_pred')

  def encode_visible(self, images: jax.Array, noise: jax.Array, train: bool):
    """Encoder on CLS + visible patches; returns (latent [B, 1+len_keep, D], mask, ids_restore)."""
    patches = self.encoder.embed_patches(images)
    visible, mask, ids_restore = random_masking(patches, noise, self.mask_ratio)
    latent = self.encoder.encode(self.encoder.with_cls(visible), train)
    return latent, mask, ids_restore

  def decode(self, latent: jax.Array, ids_restore: jax.Array, train: bool) -> jax.Array:
    """Decoder: mask tokens un-shuffled into place, CLS kept in front; returns pred [B, N, p*p*3]."""
    x = self.decoder_embed(latent)
    batch, n = ids_restore.shape
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, n + 1 - x.shape[1], x.shape[2]))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], unshuffled], axis=1)
    x = x + jnp.asarray(vit.sincos_2d_posemb(self.decoder_width, self.encoder.grid_size), x.dtype)
    for block in self.decoder_blocks:
      x = block(x, train)
    x = self.decoder_norm(x)
    return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False,
               noise: jax.Array | None = None) -> dict[str, jax.Array]:
    if noise is None:
      noise = jax.random.uniform(self.make_rng('mask'), (images.shape[0], self.encoder.num_patches))
    latent, mask, ids_restore = self.encode_visible(images, noise, train)
    pred = self.decode(latent, ids_restore, train)
    loss = mae_loss(images, pred, mask, self.encoder.patch_size, self.norm_pix_loss)
    return dict(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)


def reconstruct_images(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
                       norm_pix_loss: bool = False) -> dict[str, jax.Array]:
  """Pictures for TensorBoard, all ``[B, H, W, C]`` in the pixel space of ``images``.

  With norm_pix_loss the prediction is mapped back with each patch's true
  mean / std (as the MAE visualisation demo does).

  Returns:
    dict(masked: input with hidden patches zeroed, reconstruction: decoder output
    everywhere, pasted: visible patches from the input + reconstructed hidden ones).
  """
  patches = patchify(images.astype(jnp.float32), patch_size)
  pred = pred.astype(jnp.float32)
  if norm_pix_loss:
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
  hidden = mask.astype(jnp.float32)[:, :, None]
  channels = images.shape[-1]
  return dict(
      masked=unpatchify(patches * (1 - hidden), patch_size, channels),
      reconstruction=unpatchify(pred, patch_size, channels),
      pasted=unpatchify(patches * (1 - hidden) + pred * hidden, patch_size, channels),
  )


def mae_from_config(cfg: ml_collections.ConfigDict) -> MaskedAutoencoder:
  """Builds a :class:`MaskedAutoencoder` from a model ConfigDict.

  Encoder keys as :func:`vit.vit_from_config` (posemb defaults to 'sincos2d'
  here, the official MAE choice); extra keys: mask_ratio [0.75], decoder_width
  [512], decoder_depth [8], decoder_heads [16], decoder_mlp_dim [4 * decoder_width],
  norm_pix_loss [False], decoder_remat [None: as the encoder's remat].
  """
  encoder_kwargs = vit.vit_kwargs_from_config(cfg)
  encoder_kwargs['posemb'] = cfg.get('posemb', 'sincos2d')
  decoder_width = int(cfg.get('decoder_width', 512))
  decoder_mlp_dim = cfg.get('decoder_mlp_dim', None)
  return MaskedAutoencoder(
      encoder=vit.VisionTransformer(**encoder_kwargs),
      mask_ratio=float(cfg.get('mask_ratio', 0.75)),
      decoder_width=decoder_width,
      decoder_depth=int(cfg.get('decoder_depth', 8)),
      decoder_heads=int(cfg.get('decoder_heads', 16)),
      decoder_mlp_dim=int(decoder_mlp_dim) if decoder_mlp_dim is not None else 4 * decoder_width,
      norm_pix_loss=bool(cfg.get('norm_pix_loss', False)),
      dtype=encoder_kwargs['dtype'],
      decoder_remat=None if cfg.get('decoder_remat', None) is None else bool(cfg.decoder_remat),
  )


def _hf_block(sd: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
  """One HF ViT(MAE) layer -> our Block params; accepts transformers 5 and 4 key names."""

  def pick(*names: str) -> str:
    for name in names:
      if f'{prefix}.{name}.weight' in sd:
        return f'{prefix}.{name}'
    raise KeyError(f'none of {[f"{prefix}.{n}.weight" for n in names]} in the HF state dict')

  def linear(*names: str) -> dict[str, np.ndarray]:
    key = pick(*names)
    return dict(kernel=sd[f'{key}.weight'].T, bias=sd[f'{key}.bias'])

  def norm(name: str) -> dict[str, np.ndarray]:
    return dict(scale=sd[f'{prefix}.{name}.weight'], bias=sd[f'{prefix}.{name}.bias'])

  return dict(
      norm1=norm('layernorm_before'),
      attn=dict(query=linear('attention.q_proj', 'attention.attention.query'),
                key=linear('attention.k_proj', 'attention.attention.key'),
                value=linear('attention.v_proj', 'attention.attention.value'),
                proj=linear('attention.o_proj', 'attention.output.dense')),
      norm2=norm('layernorm_after'),
      mlp=dict(fc1=linear('mlp.fc1', 'intermediate.dense'), fc2=linear('mlp.fc2', 'output.dense')),
  )


def params_from_hf_vit_mae(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a HF ``ViTMAEForPreTraining`` state dict (numpy values) to MaskedAutoencoder params.

  The fixed position tables of HF are dropped (ours are computed); build the
  module with ``posemb='sincos2d'`` and ``layer_norm_eps=1e-12`` to match HF.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  layer_prefix = 'vit.layers' if any(k.startswith('vit.layers.') for k in sd) else 'vit.encoder.layer'
  depth = len({k.split('.')[len(layer_prefix.split('.'))] for k in sd if k.startswith(layer_prefix + '.')})
  decoder_depth = len({k.split('.')[2] for k in sd if k.startswith('decoder.decoder_layers.')})

  def linear(key: str) -> dict[str, np.ndarray]:
    return dict(kernel=sd[f'{key}.weight'].T, bias=sd[f'{key}.bias'])

  def norm(key: str) -> dict[str, np.ndarray]:
    return dict(scale=sd[f'{key}.weight'], bias=sd[f'{key}.bias'])

  encoder: dict[str, Any] = {
      'patch_embed': dict(
          kernel=sd['vit.embeddings.patch_embeddings.projection.weight'].transpose(2, 3, 1, 0),
          bias=sd['vit.embeddings.patch_embeddings.projection.bias']),
      'cls_token': sd['vit.embeddings.cls_token'].reshape(-1),
      'norm': norm('vit.layernorm'),
  }
  for i in range(depth):
    encoder[f'blocks_{i}'] = _hf_block(sd, f'{layer_prefix}.{i}')
  params: dict[str, Any] = {
      'encoder': encoder,
      'decoder_embed': linear('decoder.decoder_embed'),
      'mask_token': sd['decoder.mask_token'].reshape(-1),
      'decoder_norm': norm('decoder.decoder_norm'),
      'decoder_pred': linear('decoder.decoder_pred'),
  }
  for i in range(decoder_depth):
    params[f'decoder_blocks_{i}'] = _hf_block(sd, f'decoder.decoder_layers.{i}')
  return params
