"""Dense and LayerNorm layers whose backward pass hands on the input gradient only after the
layer's own parameter gradients are computed.

Differentiated by JAX, ``nn.Dense`` and ``nn.LayerNorm`` give XLA independent pieces: the input
gradient, which the rest of the backward pass waits for, and the parameter gradients (a
weight-gradient matmul and sums over the batch), which nothing waits for until the optimiser
update. XLA CPU's scheduler then leaves many of those sums and matmuls to the end of the
backward pass, and every activation gradient they read stays alive until then. Here each
layer's backward pass adds to its input gradient a zero that is computed from its parameter
gradients (``x + 0 * g[0]``: XLA does not fold a floating-point multiply by zero, because
``inf * 0`` is NaN), so every later step of the backward pass depends on them and they run as
soon as their inputs exist. ``jax.lax.optimization_barrier`` cannot do this on CPU: XLA CPU
removes barriers before it schedules.

The MAE ViT-B/16 training step at batch 8 on CPU: compiled temporaries 877 → 647 MiB, the same
speed and the same loss (experiments/bench/RESULTS.md). Values and gradients are those of
``nn.Dense`` / ``nn.LayerNorm`` (the backward passes are JAX's own, via ``jax.vjp``); the
parameter trees are the same, so checkpoints and weight converters are unchanged. A NaN or
infinity in a parameter gradient now also makes the layer's input gradient NaN; the train step
drops any update whose gradient norm is not finite, so no update changes.

``Dense(input_activation='gelu')`` is ``Dense(gelu(x))`` that keeps only ``x`` for its backward
pass and recomputes ``gelu(x)`` and its derivative there (one array fewer per MLP block).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
from flax.linen import dtypes
from flax.linen import normalization
import jax
import jax.numpy as jnp

from affect_jax.models import gelu


def after(x: jax.Array, *values: jax.Array) -> jax.Array:
  """``x`` plus a zero computed from the first element of each of ``values``."""
  zero = sum(v.reshape(-1)[0].astype(jnp.float32) for v in values) * 0.0
  return x + zero.astype(x.dtype)


def _affine(x, kernel, bias):
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """``x @ kernel + bias`` (``nn.Dense``'s computation)."""
  return _affine(x, kernel, bias)


def _dense_forward(x, kernel, bias):
  return jax.vjp(_affine, x, kernel, bias)


def _dense_backward(vjp, grad_out):
  grad_x, grad_kernel, grad_bias = vjp(grad_out)
  return after(grad_x, grad_kernel, grad_bias), grad_kernel, grad_bias


dense.defvjp(_dense_forward, _dense_backward)


@jax.custom_vjp
def gelu_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """``gelu(x) @ kernel + bias`` with the exact (erf) GELU."""
  return _affine(gelu.gelu(x), kernel, bias)


def _gelu_dense_forward(x, kernel, bias):
  return _affine(gelu.training_value(x), kernel, bias), (x, kernel)


def _gelu_dense_backward(residuals, grad_out):
  x, kernel = residuals
  xf, cdf, pdf = gelu.normal_cdf_pdf(x)
  activation = (xf * cdf).astype(x.dtype)
  # The weight gradient as one 2-D matmul: contracting two batch dimensions at once runs far
  # slower on XLA CPU.
  rows = grad_out.reshape(-1, grad_out.shape[-1])
  grad_kernel = jax.lax.dot_general(activation.reshape(-1, x.shape[-1]), rows, (((0,), (0,)), ((), ())))
  grad_bias = jnp.sum(rows, axis=0)
  grad_activation = jax.lax.dot_general(grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ())))
  grad_x = (grad_activation.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype)
  # No zero tied to the parameter gradients here: with it this step was 1.3x slower.
  return grad_x, grad_kernel.astype(kernel.dtype), grad_bias.astype(kernel.dtype)


gelu_dense.defvjp(_gelu_dense_forward, _gelu_dense_backward)


class Dense(nn.Dense):
  """``nn.Dense`` (kernel and bias; ``use_bias``, ``precision`` and ``dot_general`` at their
  defaults) with the backward pass of :func:`dense`.

  ``input_activation='gelu'`` applies the exact GELU to the input first (:func:`gelu_dense`).
  """

  input_activation: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self.use_bias or self.precision is not None or self.dot_general or self.dot_general_cls:
      raise ValueError('layers.Dense has a bias and uses the default dot_general and precision')
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if self.input_activation is None:
      return dense(inputs, kernel, bias)
    if self.input_activation == 'gelu':
      return gelu_dense(inputs, kernel, bias)
    raise ValueError(f'input_activation={self.input_activation!r}; expected None or "gelu"')


def _normalized(epsilon, dtype, x, scale, bias):
  """``nn.LayerNorm``'s computation over the last axis, step for step (flax's own statistics)."""
  mean, var = normalization._compute_stats(x, (-1,), dtype)  # pylint: disable=protected-access
  y = (x - mean[..., None]) * (jax.lax.rsqrt(var[..., None] + epsilon) * scale) + bias
  return jnp.asarray(y, dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def layer_norm(epsilon: float, dtype: Any, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """Layer normalisation over the last axis, then ``* scale + bias``."""
  return _normalized(epsilon, dtype, x, scale, bias)


def _layer_norm_forward(epsilon, dtype, x, scale, bias):
  return jax.vjp(functools.partial(_normalized, epsilon, dtype), x, scale, bias)


def _layer_norm_backward(epsilon, dtype, vjp, grad_out):
  del epsilon, dtype
  grad_x, grad_scale, grad_bias = vjp(grad_out)
  return after(grad_x, grad_scale, grad_bias), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.LayerNorm):
  """``nn.LayerNorm`` over the last axis (scale and bias) with the backward pass of :func:`layer_norm`."""

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    if (mask is not None or self.reduction_axes != -1 or self.feature_axes != -1 or self.axis_name
        or not (self.use_scale and self.use_bias and self.use_fast_variance)):
      raise ValueError('layers.LayerNorm normalises over the last axis only, without a mask, with '
                       'scale and bias (flax defaults otherwise)')
    scale = self.param('scale', self.scale_init, (x.shape[-1],), self.param_dtype)
    bias = self.param('bias', self.bias_init, (x.shape[-1],), self.param_dtype)
    return layer_norm(self.epsilon, self.dtype, x, scale, bias)
