"""Vision Transformer encoder (timm / MAE layer structure) and the layers it shares.

Images are NHWC ``[B, H, W, 3]``. The parameter tree mirrors timm's
``VisionTransformer`` so that timm and Hugging Face weights map one to one
(:func:`params_from_timm`); q/k/v are separate projections (timm fuses them
into ``qkv``; the converter splits it) so tensor parallelism splits heads
cleanly::

    patch_embed/{kernel [p,p,3,D], bias}
    cls_token [D]
    pos_embed [1+N, D]              (only with posemb='learn')
    blocks_i/norm1, attn/{query,key,value,proj}, norm2, mlp/{fc1,fc2}
    norm

Block names carry their depth (``blocks_0`` ...) for layer-wise lr decay.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax.models import attention
from affect_jax.models import gelu
from affect_jax.models import layers
from affect_jax.models import partitioning as P

Dtype = Any

# Exact (erf) GELU: timm's nn.GELU() and HF ViT/ViTMAE's "gelu" are both exact.
ACTIVATIONS = {
    'gelu': gelu.gelu,
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}

VIT_PRESETS: dict[str, dict[str, int]] = {
    # 'tiny' is the CPU size: at 112x112 (49 patches of 16x16) an MAE or classifier step on a batch
    # of 64 takes about 0.4 s on 2 busy CPU cores.
    'tiny': dict(width=128, depth=4, num_heads=4, mlp_dim=512),
    'S': dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    'B': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    'L': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    'H': dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}

# Official MAE initialisation: xavier-uniform linear layers, zero biases.
DEFAULT_KERNEL_INIT = nn.initializers.xavier_uniform()


def partitioned(init: Any, axes: tuple[str | None, ...]) -> Any:
  """An initialiser whose parameter carries the logical axis names ``axes``."""
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str,
          kernel_init: Any = DEFAULT_KERNEL_INIT, input_activation: str | None = None) -> layers.Dense:
  """``layers.Dense`` (``nn.Dense`` whose parameter gradients are computed at once in the
  backward pass) with logically named kernel and bias, float32 params."""
  return layers.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(kernel_init, axes),
      bias_init=partitioned(nn.initializers.zeros, axes[-1:]),
      input_activation=input_activation,
      name=name,
  )


def layer_norm(epsilon: float, dtype: Dtype, name: str, axis_name: str = P.EMBED) -> layers.LayerNorm:
  """``layers.LayerNorm`` (``nn.LayerNorm``, parameter gradients computed at once in the backward
  pass) with logically named scale and bias, float32 params."""
  return layers.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=partitioned(nn.initializers.ones, (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros, (axis_name,)),
      name=name,
  )


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Batch-sharded token activations ``[B, T, D]``; a no-op without logical axis rules."""
  return nn.with_logical_constraint(x, (P.BATCH, P.ACTIVATION_LENGTH, P.ACTIVATION_EMBED))


@functools.lru_cache(maxsize=None)
def sincos_2d_posemb(width: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding exactly as the official MAE / HF ViTMAE.

  The first half of the channels encodes the column (w) coordinate, the second
  half the row (h) coordinate (MAE's ``np.meshgrid(grid_w, grid_h)`` order);
  each half is ``[sin(pos * omega), cos(pos * omega)]`` with
  ``omega_i = 1 / 10000 ** (i / (width / 4))``. With ``cls_token`` a zero row
  is prepended for the CLS slot.

  Returns:
    float32 array ``[(1 if cls_token else 0) + gh * gw, width]`` (read-only).
  """
  if width % 4:
    raise ValueError(f'sincos_2d_posemb needs a width divisible by 4, got {width}')
  gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))

  def one_dim(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_dim(width // 2, grid_w), one_dim(width // 2, grid_h)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, width]), emb], axis=0)
  emb = emb.astype(np.float32)
  emb.setflags(write=False)
  return emb


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (timm scaling)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(keep_mask, x / keep, jnp.zeros_like(x))


def _mix32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 mixing every input bit into every output bit (C. Wellons' lowbias32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(rng: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
  """Bernoulli(keep) booleans of ``shape``: a counter-based hash of each element's index.

  Threefry, which ``jax.random`` runs for every element (or every second one with 16-bit halves),
  was most of the 847 ms of add and concatenate fusions among the 3.8 s of XLA thunk time in the
  paper-preset temporal training step on CPU (its attention weights alone are B x heads x T x T
  per layer). One layer's attention weights, 11.5 M elements, dropout included: 61 ms with 16-bit
  threefry halves, 17 ms here. Two 32-bit words drawn from ``rng`` with ``jax.random.bits`` seed a
  hash of the element's position in ``shape`` (row-major index ``i``): ``word = mix(mix(i ^ seed0)
  + seed1)``, kept when ``word < keep * 2^32``. ``mix`` is a bijection, so within one mask no two
  elements share a word; like JAX's partitionable threefry, the mask depends only on the key and
  the element's global position, so it is the same under any sharding. Arrays of 2^32 elements or
  more fall back to ``jax.random.bernoulli``.
  """
  size = int(np.prod(shape, dtype=np.int64))
  if keep >= 1.0:
    return jnp.ones(shape, bool)
  if size >= 2**32:
    return jax.random.bernoulli(rng, keep, shape)
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  words = _mix32(_mix32(index ^ seed[0]) + seed[1])
  return words < jnp.uint32(min(int(round(keep * 2**32)), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (``nn.Dropout`` semantics, 'dropout' RNG stream) with :func:`keep_mask`."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = keep_mask(self.make_rng('dropout'), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections and an output ``proj``.

  ``key_mask`` [B, T] (True = real) hides keys, so masked positions never
  influence any query. Attention-weight dropout (PyTorch ``nn.MultiheadAttention``
  semantics) needs the explicit softmax path; otherwise ``attention.dot_product_attention``,
  whose backward pass recomputes the weights instead of keeping them.
  """

  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, key_mask: jax.Array | None = None,
               norm: layers.LayerNorm | None = None) -> jax.Array:
    """``norm``: the pre-norm block's LayerNorm, applied to ``x`` fused with the q, k and v
    projections (``layers.norm_dense``: its output is recomputed in the backward pass)."""
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    names = ('query', 'key', 'value')
    if norm is None:
      projected = [dense(width, (P.EMBED, P.HEADS), self.dtype, name)(x) for name in names]
    else:
      scale, bias = norm(x, return_parameters=True)
      kernels, biases = zip(*(dense(width, (P.EMBED, P.HEADS), self.dtype, name)(x, return_parameters=True)
                              for name in names))
      projected = layers.norm_dense(norm.epsilon, norm.dtype, x, scale, bias, kernels, biases)
    query, key, value = (y.reshape(batch, length, self.num_heads, head_dim) for y in projected)
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    if train and self.attention_dropout > 0.0:
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key).astype(jnp.float32) / np.sqrt(head_dim)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1)
      weights = Dropout(self.attention_dropout)(weights, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), value)
    else:
      out = attention.dot_product_attention(query, key, value, mask)
    out = out.reshape(batch, length, width)
    out = dense(width, (P.HEADS, P.EMBED), self.dtype, 'proj')(out)
    return Dropout(self.dropout)(out, deterministic=not train)


class Mlp(nn.Module):
  """fc1 -> activation -> dropout -> fc2 -> dropout (timm ``Mlp``)."""

  hidden_dim: int
  dropout: float = 0.0
  activation: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, norm: layers.LayerNorm | None = None) -> jax.Array:
    """``norm``: the pre-norm block's LayerNorm, applied to ``x`` first; with the GELU and no
    dropout it is fused with the whole MLP (``layers.norm_mlp``)."""
    width = x.shape[-1]
    fused = self.activation == 'gelu' and not (train and self.dropout > 0.0)
    if norm is not None and fused:
      scale, bias = norm(x, return_parameters=True)
      fc1 = dense(self.hidden_dim, (P.EMBED, P.MLP), self.dtype, 'fc1')
      kernel1, bias1 = fc1(x, return_parameters=True)
      fc2 = dense(width, (P.MLP, P.EMBED), self.dtype, 'fc2', input_activation='gelu')
      # (a placeholder input: it only gives fc2's kernel its shape)
      kernel2, bias2 = fc2(jnp.zeros((1, self.hidden_dim), x.dtype), return_parameters=True)
      y = layers.norm_mlp(norm.epsilon, norm.dtype, x, scale, bias, kernel1, bias1, kernel2, bias2)
      return Dropout(self.dropout)(y, deterministic=not train)
    if norm is not None:
      x = norm(x)
    y = dense(self.hidden_dim, (P.EMBED, P.MLP), self.dtype, 'fc1')(x)
    if fused:
      # GELU inside fc2: its backward pass recomputes gelu(y) instead of keeping it.
      y = dense(width, (P.MLP, P.EMBED), self.dtype, 'fc2', input_activation='gelu')(y)
      return Dropout(self.dropout)(y, deterministic=not train)
    y = ACTIVATIONS[self.activation](y)
    y = Dropout(self.dropout)(y, deterministic=not train)
    y = dense(width, (P.MLP, P.EMBED), self.dtype, 'fc2')(y)
    return Dropout(self.dropout)(y, deterministic=not train)


class Block(nn.Module):
  """Pre-norm transformer block (timm ``Block``)."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, key_mask: jax.Array | None = None) -> jax.Array:
    # Each LayerNorm is fused into the layers that read it (layers.norm_dense / norm_mlp).
    norm1 = layer_norm(self.layer_norm_eps, self.dtype, 'norm1')
    y = Attention(self.num_heads, self.dropout, self.attention_dropout, self.dtype, name='attn')(
        x, train, key_mask, norm=norm1)
    x = x + DropPath(self.drop_path, name='drop_path1')(y, train)
    norm2 = layer_norm(self.layer_norm_eps, self.dtype, 'norm2')
    y = Mlp(self.mlp_dim, self.dropout, 'gelu', self.dtype, name='mlp')(x, train, norm=norm2)
    x = x + DropPath(self.drop_path, name='drop_path2')(y, train)
    return constrain_tokens(x)


class VisionTransformer(nn.Module):
  """ViT encoder returning ``dict(cls=[B, D], patches=[B, N, D])`` after the final norm.

  Attributes:
    width, depth, num_heads, mlp_dim: transformer sizes (see ``VIT_PRESETS``).
    patch_size: side of the square patches (conv stride = kernel = patch_size).
    image_size: side of the square input images (fixes the number of patches).
    posemb: 'learn' (parameter ``pos_embed`` [1+N, D], CLS slot included, as timm)
      or 'sincos2d' (fixed MAE table with a zero CLS row; not a parameter).
    dropout: dropout after the position embedding, in attention ``proj`` and MLP.
    attention_dropout: dropout on attention weights.
    drop_path: stochastic depth rate, increased linearly from 0 to this value over
      the blocks (timm / MAE fine-tuning convention).
    layer_norm_eps: 1e-6 for timm / official MAE, 1e-12 for HF ViTMAE.
    dtype: compute dtype (params stay float32).
    remat: rematerialise each block in the backward pass (saves memory).

  Pieces MAE reuses: :meth:`embed_patches`, :meth:`cls_embedding`, :meth:`encode`.
  """

  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  posemb: str = 'learn'
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of patch_size {self.patch_size}')
    if self.posemb not in ('learn', 'sincos2d'):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
    p = self.patch_size
    self.patch_embed = nn.Conv(
        self.width, (p, p), strides=(p, p), padding='VALID',
        dtype=self.dtype, param_dtype=jnp.float32,
        # MAE initialises the patch projection like a linear layer on flattened patches.
        kernel_init=partitioned(nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
                                (P.PATCH_HEIGHT, P.PATCH_WIDTH, P.IMAGE_CHANNELS, P.EMBED)),
        bias_init=partitioned(nn.initializers.zeros, (P.EMBED,)),
        name='patch_embed')
    self.cls_token = self.param(
        'cls_token', partitioned(nn.initializers.normal(0.02), (P.EMBED,)), (self.width,), jnp.float32)
    if self.posemb == 'learn':
      self.pos_embed = self.param(
          'pos_embed', partitioned(nn.initializers.normal(0.02), (P.LENGTH, P.EMBED)),
          (1 + self.num_patches, self.width), jnp.float32)
    else:
      self.pos_embed = jnp.asarray(sincos_2d_posemb(self.width, self.grid_size))
    self.pos_drop = Dropout(self.dropout)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    self.blocks = [
        block_cls(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                  self.drop_path * i / max(self.depth - 1, 1), self.layer_norm_eps, self.dtype)
        for i in range(self.depth)
    ]
    self.norm = layer_norm(self.layer_norm_eps, self.dtype, 'norm')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` images -> patch tokens ``[B, N, D]`` with position embedding (no CLS)."""
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f'VisionTransformer expects images [B, {self.image_size}, {self.image_size}, C] (NHWC), '
          f'got shape {images.shape}')
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    return x + self.pos_embed[1:].astype(self.dtype)

  def cls_embedding(self) -> jax.Array:
    """CLS token plus its position embedding, ``[D]``."""
    return (self.cls_token + self.pos_embed[0]).astype(self.dtype)

  def encode(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """Dropout, the blocks and the final norm on a ``[B, T, D]`` token sequence."""
    x = self.pos_drop(tokens, deterministic=not train)
    for block in self.blocks:
      x = block(x, train)
    return self.norm(x)

  def with_cls(self, patch_tokens: jax.Array) -> jax.Array:
    """Prepends the CLS embedding: ``[B, N, D]`` -> ``[B, 1+N, D]``."""
    cls = jnp.broadcast_to(self.cls_embedding(), (patch_tokens.shape[0], 1, self.width))
    return jnp.concatenate([cls, patch_tokens], axis=1)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = self.encode(self.with_cls(self.embed_patches(images)), train)
    return dict(cls=x[:, 0], patches=x[:, 1:])


def dtype_from_name(name: str) -> Dtype:
  """Maps a config dtype string to a jnp dtype."""
  try:
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]
  except KeyError:
    raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {name!r}") from None


def vit_kwargs_from_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """VisionTransformer keyword arguments from a model config (see :func:`vit_from_config`)."""
  variant = cfg.get('variant', 'B')
  if variant not in VIT_PRESETS:
    raise ValueError(f'model.variant must be one of {sorted(VIT_PRESETS)}, got {variant!r}')
  sizes = dict(VIT_PRESETS[variant])
  for key in sizes:
    if cfg.get(key, None) is not None:
      sizes[key] = int(cfg[key])
  return dict(
      **sizes,
      patch_size=int(cfg.get('patch_size', 16)),
      image_size=int(cfg.get('image_size', 224)),
      posemb=cfg.get('posemb', 'learn'),
      dropout=float(cfg.get('dropout', 0.0)),
      attention_dropout=float(cfg.get('attention_dropout', 0.0)),
      drop_path=float(cfg.get('drop_path', 0.0)),
      layer_norm_eps=float(cfg.get('layer_norm_eps', 1e-6)),
      dtype=dtype_from_name(cfg.get('dtype', 'float32')),
      remat=bool(cfg.get('remat', False)),
  )


def vit_from_config(cfg: ml_collections.ConfigDict) -> VisionTransformer:
  """Builds a :class:`VisionTransformer` from a model ConfigDict.

  Keys (all optional, defaults in brackets): variant ['B'] (a ``VIT_PRESETS`` key),
  width / depth / num_heads / mlp_dim [from the preset; a non-None value
  overrides it], patch_size [16], image_size [224], posemb ['learn' |
  'sincos2d'], dropout [0], attention_dropout [0], drop_path [0],
  layer_norm_eps [1e-6], dtype ['float32' | 'bfloat16' | 'float16'], remat [False].
  """
  return VisionTransformer(**vit_kwargs_from_config(cfg))


def params_from_timm(state_dict: Mapping[str, np.ndarray], depth: int) -> dict[str, Any]:
  """Converts a timm ``VisionTransformer`` state dict (numpy values) to our encoder params.

  Handles fused ``qkv`` weights; ignores the classifier head and ``fc_norm``.
  The returned tree is unboxed, ``{'patch_embed': ..., 'blocks_0': ..., ...}``.
  A learned ``pos_embed`` is included when present in the state dict.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}

  def linear(prefix: str) -> dict[str, np.ndarray]:
    return dict(kernel=sd[f'{prefix}.weight'].T, bias=sd[f'{prefix}.bias'])

  def norm(prefix: str) -> dict[str, np.ndarray]:
    return dict(scale=sd[f'{prefix}.weight'], bias=sd[f'{prefix}.bias'])

  params: dict[str, Any] = {
      'patch_embed': dict(kernel=sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
                          bias=sd['patch_embed.proj.bias']),
      'cls_token': sd['cls_token'].reshape(-1),
      'norm': norm('norm'),
  }
  if 'pos_embed' in sd:
    params['pos_embed'] = sd['pos_embed'][0]
  for i in range(depth):
    prefix = f'blocks.{i}'
    width = sd[f'{prefix}.attn.proj.weight'].shape[0]
    qkv_w, qkv_b = sd[f'{prefix}.attn.qkv.weight'], sd[f'{prefix}.attn.qkv.bias']
    attn = {name: dict(kernel=qkv_w[j * width:(j + 1) * width].T, bias=qkv_b[j * width:(j + 1) * width])
            for j, name in enumerate(('query', 'key', 'value'))}
    attn['proj'] = linear(f'{prefix}.attn.proj')
    params[f'blocks_{i}'] = dict(
        norm1=norm(f'{prefix}.norm1'), attn=attn, norm2=norm(f'{prefix}.norm2'),
        mlp=dict(fc1=linear(f'{prefix}.mlp.fc1'), fc2=linear(f'{prefix}.mlp.fc2')))
  return params


def replace_params(target: Any, source: Any, where: str = 'params') -> Any:
  """Returns ``target`` with its leaves replaced by ``source``'s, keeping boxes.

  ``target`` may hold ``nn.LogicallyPartitioned`` boxes (straight from
  ``init``) or plain arrays; ``source`` may be boxed or not. Raises a
  ValueError naming the first path whose parameter names or shape differ.
  """
  source = nn.unbox(source)
  if isinstance(target, Mapping):
    if not isinstance(source, Mapping) or set(target) != set(source):
      source_keys = set(source) if isinstance(source, Mapping) else set()
      raise ValueError(f'{where}: parameter names differ (missing {sorted(set(target) - source_keys)}, '
                       f'unexpected {sorted(source_keys - set(target))})')
    return {k: replace_params(target[k], source[k], f'{where}/{k}') for k in target}
  value = target.unbox() if isinstance(target, nn.LogicallyPartitioned) else target
  if tuple(np.shape(source)) != tuple(np.shape(value)):
    raise ValueError(f'{where}: shape {tuple(np.shape(source))} does not match expected {tuple(np.shape(value))}')
  new = jnp.asarray(source, dtype=value.dtype)
  return target.replace_boxed(new) if isinstance(target, nn.LogicallyPartitioned) else new
