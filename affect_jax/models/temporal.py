"""Temporal model: TCN -> 1x1 projection -> Transformer encoder -> per-frame MLP head.

``TemporalModel.apply(vars, features [B,T,D], frame_mask [B,T] bool, train=...,
rngs={'dropout': ...}, mutable=['batch_stats'] when train) -> [B, T, num_outputs]``.

Padded frames (``frame_mask`` False) never influence real frames: inputs are
zeroed before the TCN and after each of its convolutions, padded keys are
hidden from attention, and the head's BatchNorm statistics are computed over
real frames only.

Parameter tree: ``tcn/blocks_i/...``, ``input_proj``, ``transformer/layers_i/...``,
``head_hidden``, ``head_norm``, ``head_out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax.models import partitioning as P
from affect_jax.models import tcn as tcn_lib
from affect_jax.models import vit

HEAD_NORMS = ('batch', 'layer')
POSEMBS = ('none', 'sincos')


def sincos_1d_posemb(length: int, width: int) -> np.ndarray:
  """Vaswani et al. sinusoidal encoding ``[length, width]``: sin on even, cos on odd channels."""
  if width % 2:
    raise ValueError(f'sincos position encoding needs an even width, got {width}')
  position = np.arange(length, dtype=np.float64)[:, None]
  div = np.exp(np.arange(0, width, 2, dtype=np.float64) * (-np.log(10000.0) / width))
  table = np.zeros((length, width))
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)
  return table.astype(np.float32)


def _activation(name: str):
  if name == 'none':
    return lambda x: x
  if name not in vit.ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(vit.ACTIVATIONS) + ['none']}, got {name!r}")
  return vit.ACTIVATIONS[name]


class TransformerEncoderLayer(nn.Module):
  """Transformer layer as ``torch.nn.TransformerEncoderLayer`` (post-norm unless norm_first)."""

  num_heads: int
  ff_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  activation: str = 'relu'
  norm_first: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    attention = vit.Attention(self.num_heads, self.dropout, self.attention_dropout, self.dtype, name='attn')
    mlp = vit.Mlp(self.ff_dim, self.dropout, self.activation, self.dtype, name='mlp')
    norm1 = vit.layer_norm(self.layer_norm_eps, self.dtype, 'norm1')
    norm2 = vit.layer_norm(self.layer_norm_eps, self.dtype, 'norm2')
    if self.norm_first:
      x = x + attention(norm1(x), train, key_mask)
      x = x + mlp(norm2(x), train)
    else:
      x = norm1(x + attention(x, train, key_mask))
      x = norm2(x + mlp(x, train))
    return vit.constrain_tokens(x)


class TransformerEncoder(nn.Module):
  """``num_layers`` :class:`TransformerEncoderLayer`; a final norm only when norm_first."""

  num_layers: int
  num_heads: int
  ff_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  activation: str = 'relu'
  norm_first: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_layers):
      x = TransformerEncoderLayer(self.num_heads, self.ff_dim, self.dropout, self.attention_dropout,
                                  self.activation, self.norm_first, self.layer_norm_eps, self.dtype,
                                  name=f'layers_{i}')(x, key_mask, train)
    if self.norm_first:
      x = vit.layer_norm(self.layer_norm_eps, self.dtype, 'norm')(x)
    return x


class TemporalModel(nn.Module):
  """Per-frame predictor over a segment of frame features.

  Attributes:
    num_outputs: 2 (VA), 8 (EXPR) or 12 (AU).
    tcn_channels / tcn_dilations: one TCN block per pair.
    tcn_kernel_size, tcn_causal, tcn_weight_norm, tcn_activation, tcn_dropout: TCN options.
    proj_dim: width of the 1x1 projection and of the transformer.
    num_layers, num_heads, ff_dim: transformer sizes.
    dropout: dropout in the transformer (residual branches and FF hidden) and the head.
    attention_dropout: dropout on attention weights (PyTorch applies ``dropout`` there too).
    transformer_activation: FF activation ('relu', PyTorch's default).
    norm_first: pre-norm transformer layers (PyTorch default False = post-norm).
    posemb: 'none' (paper) or 'sincos' added after the projection.
    head_hidden, head_norm ('batch' | 'layer'), head_activation: the head
      Linear(proj_dim -> head_hidden) -> norm -> activation -> dropout -> Linear.
    dtype: compute dtype (params float32; output float32).
  """

  num_outputs: int
  tcn_channels: Sequence[int] = (256, 128, 128)
  tcn_dilations: Sequence[int] = (1, 2, 4)
  tcn_kernel_size: int = 5
  tcn_causal: bool = True
  tcn_weight_norm: bool = True
  tcn_activation: str = 'prelu'
  tcn_dropout: float = 0.0
  proj_dim: int = 512
  num_layers: int = 8
  num_heads: int = 4
  ff_dim: int = 512
  dropout: float = 0.3
  attention_dropout: float = 0.3
  transformer_activation: str = 'relu'
  norm_first: bool = False
  posemb: str = 'none'
  head_hidden: int = 256
  head_norm: str = 'batch'
  head_activation: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, frame_mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    if features.ndim != 3:
      raise ValueError(f'TemporalModel expects features [B, T, D], got shape {features.shape}')
    if self.head_norm not in HEAD_NORMS:
      raise ValueError(f'head_norm must be one of {HEAD_NORMS}, got {self.head_norm!r}')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb must be one of {POSEMBS}, got {self.posemb!r}')
    if frame_mask is None:
      frame_mask = jnp.ones(features.shape[:2], bool)
    if frame_mask.shape != features.shape[:2]:
      raise ValueError(f'frame_mask shape {frame_mask.shape} does not match features {features.shape[:2]}')
    frame_mask = frame_mask.astype(bool)

    x = tcn_lib.TCN(self.tcn_channels, self.tcn_dilations, self.tcn_kernel_size, self.tcn_causal,
                    self.tcn_weight_norm, self.tcn_activation, self.tcn_dropout, self.dtype,
                    name='tcn')(features, frame_mask, train)
    x = vit.dense(self.proj_dim, (P.CHANNELS_IN, P.EMBED), self.dtype, 'input_proj')(x)
    if self.posemb == 'sincos':
      x = x + jnp.asarray(sincos_1d_posemb(x.shape[1], self.proj_dim), x.dtype)
    x = TransformerEncoder(self.num_layers, self.num_heads, self.ff_dim, self.dropout,
                           self.attention_dropout, self.transformer_activation, self.norm_first,
                           dtype=self.dtype, name='transformer')(x, frame_mask, train)

    x = vit.dense(self.head_hidden, (P.EMBED, P.MLP), self.dtype, 'head_hidden')(x)
    if self.head_norm == 'batch':
      # PyTorch BatchNorm1d defaults (momentum 0.1 == flax 0.9, eps 1e-5); statistics
      # over real frames only.
      x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
          param_dtype=jnp.float32, use_fast_variance=False,
          scale_init=vit.partitioned(nn.initializers.ones, (P.MLP,)),
          bias_init=vit.partitioned(nn.initializers.zeros, (P.MLP,)),
          name='head_norm')(x, mask=frame_mask[:, :, None])
    else:
      x = vit.layer_norm(1e-5, self.dtype, 'head_norm', axis_name=P.MLP)(x)
    x = _activation(self.head_activation)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = vit.dense(self.num_outputs, (P.MLP, P.CLASSES), self.dtype, 'head_out')(x)
    return x.astype(jnp.float32)


def temporal_model_from_config(cfg: ml_collections.ConfigDict, num_outputs: int) -> TemporalModel:
  """Builds a :class:`TemporalModel` from a model ConfigDict.

  Required keys: tcn_channels (tuple, output channels of each TCN block),
  tcn_kernel_size, tcn_dilations (tuple, one per block), tcn_causal,
  tcn_weight_norm, tcn_activation ('prelu'|'relu'|'gelu'), tcn_dropout,
  proj_dim, num_layers, num_heads, ff_dim, dropout, posemb ('none'|'sincos'),
  head_hidden, head_norm ('batch'|'layer'), dtype ('float32'|'bfloat16').
  Optional: attention_dropout [= dropout, as PyTorch], transformer_activation
  ['relu'], norm_first [False], head_activation ['relu'].

  The paper preset maps "768 -> 256 -> 128, dilations 1, 2, 4" to
  tcn_channels=(256, 128, 128), tcn_dilations=(1, 2, 4): the first block
  reduces 768 -> 256 at dilation 1, the second 256 -> 128 at dilation 2, the
  third keeps 128 at dilation 4 (identity residual).
  """
  required = ('tcn_channels', 'tcn_kernel_size', 'tcn_dilations', 'tcn_causal', 'tcn_weight_norm',
              'tcn_activation', 'tcn_dropout', 'proj_dim', 'num_layers', 'num_heads', 'ff_dim',
              'dropout', 'posemb', 'head_hidden', 'head_norm', 'dtype')
  missing = [key for key in required if key not in cfg]
  if missing:
    raise ValueError(f'temporal model config lacks keys {missing}')
  return TemporalModel(
      num_outputs=num_outputs,
      tcn_channels=tuple(int(c) for c in cfg.tcn_channels),
      tcn_dilations=tuple(int(d) for d in cfg.tcn_dilations),
      tcn_kernel_size=int(cfg.tcn_kernel_size),
      tcn_causal=bool(cfg.tcn_causal),
      tcn_weight_norm=bool(cfg.tcn_weight_norm),
      tcn_activation=cfg.tcn_activation,
      tcn_dropout=float(cfg.tcn_dropout),
      proj_dim=int(cfg.proj_dim),
      num_layers=int(cfg.num_layers),
      num_heads=int(cfg.num_heads),
      ff_dim=int(cfg.ff_dim),
      dropout=float(cfg.dropout),
      attention_dropout=float(cfg.get('attention_dropout', cfg.dropout)),
      transformer_activation=cfg.get('transformer_activation', 'relu'),
      norm_first=bool(cfg.get('norm_first', False)),
      posemb=cfg.posemb,
      head_hidden=int(cfg.head_hidden),
      head_norm=cfg.head_norm,
      head_activation=cfg.get('head_activation', 'relu'),
      dtype=vit.dtype_from_name(cfg.dtype),
  )
