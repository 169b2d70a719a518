"""Temporal convolutional network (Bai et al. 2018 residual blocks) over ``[B, T, C]``.

Each :class:`TemporalBlock` is conv -> act -> dropout -> conv -> act -> dropout,
plus a residual (a 1x1 convolution when the channel count changes), then a
final activation, as in the reference ``TemporalConvNet``. With a frame mask,
padded frames are zeroed after every convolution so that, with centred
padding too, a real frame sees exactly the zeros it would see at the end of an
unpadded segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from affect_jax.models import partitioning as P
from affect_jax.models import vit

TCN_ACTIVATIONS = ('prelu', 'relu', 'gelu')


class PReLU(nn.Module):
  """PReLU with one shared slope, initialised to 0.25 like ``torch.nn.PReLU()``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param('slope', vit.partitioned(nn.initializers.constant(0.25), ()), (), jnp.float32)
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def activation_layer(name: str, module_name: str) -> Any:
  """A fresh PReLU module (own slope) or a parameter-free activation function."""
  if name == 'prelu':
    return PReLU(name=module_name)
  if name in ('relu', 'gelu'):
    return vit.ACTIVATIONS[name]
  raise ValueError(f'activation must be one of {TCN_ACTIVATIONS}, got {name!r}')


class Conv1D(nn.Module):
  """Dilated 1-D convolution with causal or centred zero padding, optional weight norm.

  Weight norm follows ``torch.nn.utils.weight_norm`` (dim=0): kernel =
  ``g * v / ||v||`` with the norm over taps and input channels, one ``g`` per
  output channel, initialised to ``||v||`` so the initial kernel equals ``v``.
  Params: ``kernel`` [k, C_in, C_out] (v), ``scale`` [C_out] (g), ``bias``.
  """

  features: int
  kernel_size: int
  dilation: int = 1
  causal: bool = True
  weight_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    # The reference TCN initialises conv weights N(0, 0.01).
    kernel = self.param('kernel', vit.partitioned(nn.initializers.normal(0.01), (P.CONV_WIDTH, P.CHANNELS_IN, P.CHANNELS)),
                        (self.kernel_size, in_features, self.features), jnp.float32)
    if self.weight_norm:
      norm = jnp.sqrt(jnp.sum(kernel**2, axis=(0, 1)))
      scale = self.param('scale', vit.partitioned(lambda *_: norm, (P.CHANNELS,)), (self.features,), jnp.float32)
      kernel = kernel * (scale / norm)
    bias = self.param('bias', vit.partitioned(nn.initializers.zeros, (P.CHANNELS,)), (self.features,), jnp.float32)
    total = (self.kernel_size - 1) * self.dilation
    padding = (total, 0) if self.causal else (total // 2, total - total // 2)
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1,), padding=[padding],
        rhs_dilation=(self.dilation,), dimension_numbers=('NWC', 'WIO', 'NWC'))
    return y + bias.astype(self.dtype)


class TemporalBlock(nn.Module):
  """One residual block at one dilation."""

  features: int
  kernel_size: int
  dilation: int
  causal: bool = True
  weight_norm: bool = True
  activation: str = 'prelu'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """x [B, T, C_in], mask [B, T, 1] (1 = real frame) -> [B, T, features]."""
    y = x
    for i in (1, 2):
      y = Conv1D(self.features, self.kernel_size, self.dilation, self.causal, self.weight_norm,
                 self.dtype, name=f'conv{i}')(y)
      y = activation_layer(self.activation, f'act{i}')(y)
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      y = y * mask
    if x.shape[-1] != self.features:
      residual = vit.dense(self.features, (P.CHANNELS_IN, P.CHANNELS), self.dtype, 'downsample',
                           kernel_init=nn.initializers.normal(0.01))(x)
    else:
      residual = x
    return activation_layer(self.activation, 'act_out')(y + residual) * mask


class TCN(nn.Module):
  """Stack of :class:`TemporalBlock`, one per (channels[i], dilations[i]).

  Attributes:
    channels: output channels of each block.
    dilations: dilation of each block (same length as ``channels``).
    kernel_size, causal, weight_norm, activation ('prelu'|'relu'|'gelu'), dropout, dtype.
  """

  channels: Sequence[int]
  dilations: Sequence[int]
  kernel_size: int = 5
  causal: bool = True
  weight_norm: bool = True
  activation: str = 'prelu'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B, T, C], frame_mask [B, T] bool (True = real) -> [B, T, channels[-1]]."""
    if len(self.channels) != len(self.dilations):
      raise ValueError(f'TCN needs one dilation per block: channels {tuple(self.channels)} vs '
                       f'dilations {tuple(self.dilations)}')
    if self.activation not in TCN_ACTIVATIONS:
      raise ValueError(f'activation must be one of {TCN_ACTIVATIONS}, got {self.activation!r}')
    if frame_mask is None:
      mask = jnp.ones(x.shape[:2] + (1,), self.dtype)
    else:
      mask = frame_mask[:, :, None].astype(self.dtype)
    x = x.astype(self.dtype) * mask
    for i, (features, dilation) in enumerate(zip(self.channels, self.dilations)):
      x = TemporalBlock(features, self.kernel_size, dilation, self.causal, self.weight_norm,
                        self.activation, self.dropout, self.dtype, name=f'blocks_{i}')(x, mask, train)
    return x
