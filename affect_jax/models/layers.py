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

``norm_dense`` / ``norm_mlp`` fuse a pre-norm block's LayerNorm into the layers that read its
output (q, k, v; the whole MLP): the backward pass recomputes the normalised input from the
residual and the per-token statistics instead of keeping it, and ``norm_mlp`` ties fc2's
parameter gradients into its input gradient too (tied inside ``Dense(input_activation='gelu')``
alone, that made the step 1.2-1.3x slower). ViT blocks (``vit.Block``) use them. The MAE
ViT-B/16 training step at batch 8 on CPU: compiled temporaries 646.6 -> 516.5 MiB, the tiny
preset's 72.1 -> 59.8 MiB, the same loss (experiments/bench/RESULTS.md).
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


def _gelu_dense_grads(x, kernel, grad_out):
  """(grad_x, grad_kernel, grad_bias) of ``gelu(x) @ kernel + bias``, recomputing gelu(x)."""
  xf, cdf, pdf = gelu.normal_cdf_pdf(x)
  activation = (xf * cdf).astype(x.dtype)
  # The weight gradient as one 2-D matmul: contracting two batch dimensions at once runs far
  # slower on XLA CPU.
  rows = grad_out.reshape(-1, grad_out.shape[-1])
  grad_kernel = jax.lax.dot_general(activation.reshape(-1, x.shape[-1]), rows, (((0,), (0,)), ((), ())))
  grad_bias = jnp.sum(rows, axis=0)
  grad_activation = jax.lax.dot_general(grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ())))
  grad_x = (grad_activation.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype)
  return grad_x, grad_kernel.astype(kernel.dtype), grad_bias.astype(kernel.dtype)


def _gelu_dense_backward(residuals, grad_out):
  # No zero tied to the parameter gradients here: with it this step was 1.3x slower.
  return _gelu_dense_grads(*residuals, grad_out)


gelu_dense.defvjp(_gelu_dense_forward, _gelu_dense_backward)


class Dense(nn.Dense):
  """``nn.Dense`` (kernel and bias; ``use_bias``, ``precision`` and ``dot_general`` at their
  defaults) with the backward pass of :func:`dense`.

  ``input_activation='gelu'`` applies the exact GELU to the input first (:func:`gelu_dense`).
  ``return_parameters=True`` returns ``(kernel, bias)`` in the compute dtype instead (for
  :func:`norm_dense` / :func:`norm_mlp`), created under this module's name as for a call.
  """

  input_activation: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, *, return_parameters: bool = False):
    if not self.use_bias or self.precision is not None or self.dot_general or self.dot_general_cls:
      raise ValueError('layers.Dense has a bias and uses the default dot_general and precision')
    kernel = self.param('kernel', self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if return_parameters:
      return kernel, bias
    if self.input_activation is None:
      return dense(inputs, kernel, bias)
    if self.input_activation == 'gelu':
      return gelu_dense(inputs, kernel, bias)
    raise ValueError(f'input_activation={self.input_activation!r}; expected None or "gelu"')


def _norm_forward(epsilon, dtype, x, scale, bias):
  """``nn.LayerNorm``'s computation over the last axis, step for step (flax's own statistics):
  (normalised x, per-token mean ``[...]``, per-token 1/std ``[..., 1]``)."""
  mean, var = normalization._compute_stats(x, (-1,), dtype)  # pylint: disable=protected-access
  rstd = jax.lax.rsqrt(var[..., None] + epsilon)
  y = (x - mean[..., None]) * (rstd * scale) + bias
  return jnp.asarray(y, dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)), mean, rstd


def _normalized(epsilon, dtype, x, scale, bias):
  return _norm_forward(epsilon, dtype, x, scale, bias)[0]


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


# --- a LayerNorm fused into the layers that read its output ---------------------------------------
#
# A pre-norm transformer block normalises its residual stream and hands the result to matmuls
# (q, k, v; the MLP's fc1). Differentiated as separate layers, the normalised array is kept for
# the matmuls' weight gradients on top of the residual the LayerNorm keeps for itself. Fused, the
# backward pass recomputes it from the residual and the per-token mean and 1/std: one [.., D]
# array fewer per LayerNorm. The recomputation is written differently from the forward pass's
# expression (``x * r - mean * r`` against ``(x - mean) * (r * scale)``) so that XLA's
# common-subexpression elimination cannot merge the two and keep the forward's array after all.


def _norm_matmul_grads(norm_residuals, kernels, grads_out, dtype):
  """Gradients of ``outs_i = LN(x) @ kernels[i] + b_i`` given ``grads_out``, recomputing LN(x)
  (in the dtype the LayerNorm's output had: that of x, scale and bias, or ``dtype`` if set).

  Returns (grad_x, grad_scale, grad_bias, grad_kernels, grad_biases), grad_x not yet tied to the
  parameter gradients.
  """
  x, mean, rstd, scale, bias = norm_residuals
  xhat = x.astype(jnp.float32) * rstd - mean[..., None] * rstd
  y = (xhat * scale + bias).astype(dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype))
  rows_y = y.reshape(-1, y.shape[-1])
  grad_kernels, grad_biases, grad_y = [], [], 0.0
  for kernel, grad_out in zip(kernels, grads_out):
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_kernels.append(jax.lax.dot_general(rows_y, rows, (((0,), (0,)), ((), ()))).astype(kernel.dtype))
    grad_biases.append(jnp.sum(rows, axis=0).astype(kernel.dtype))
    grad_y = grad_y + jax.lax.dot_general(
        grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ()))).astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  grad_scale = jnp.sum(grad_y * xhat, axis=axes).astype(scale.dtype)
  grad_bias = jnp.sum(grad_y, axis=axes).astype(bias.dtype)
  grad_xhat = grad_y * scale
  grad_x = rstd * (grad_xhat - grad_xhat.mean(-1, keepdims=True)
                              - xhat * (grad_xhat * xhat).mean(-1, keepdims=True))
  return grad_x.astype(x.dtype), grad_scale, grad_bias, tuple(grad_kernels), tuple(grad_biases)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def norm_dense(epsilon: float, dtype: Any, x: jax.Array, scale: jax.Array, bias: jax.Array,
               kernels: tuple[jax.Array, ...], biases: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """``tuple(layer_norm(x) @ k + b for k, b in zip(kernels, biases))``; see the comment above."""
  y = _normalized(epsilon, dtype, x, scale, bias)
  return tuple(_affine(y, k, b) for k, b in zip(kernels, biases))


def _norm_dense_forward(epsilon, dtype, x, scale, bias, kernels, biases):
  y, mean, rstd = _norm_forward(epsilon, dtype, x, scale, bias)
  outs = tuple(_affine(y, k, b) for k, b in zip(kernels, biases))
  return outs, ((x, mean, rstd, scale, bias), kernels)


def _norm_dense_backward(epsilon, dtype, residuals, grads_out):
  del epsilon
  norm_residuals, kernels = residuals
  grad_x, grad_scale, grad_bias, grad_kernels, grad_biases = _norm_matmul_grads(
      norm_residuals, kernels, grads_out, dtype)
  grad_x = after(grad_x, grad_scale, grad_bias, *grad_kernels, *grad_biases)
  return grad_x, grad_scale, grad_bias, grad_kernels, grad_biases


norm_dense.defvjp(_norm_dense_forward, _norm_dense_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def norm_mlp(epsilon: float, dtype: Any, x: jax.Array, scale: jax.Array, bias: jax.Array,
             kernel1: jax.Array, bias1: jax.Array, kernel2: jax.Array, bias2: jax.Array) -> jax.Array:
  """``gelu(layer_norm(x) @ kernel1 + bias1) @ kernel2 + bias2`` (exact GELU).

  The backward pass keeps x, the per-token statistics and the hidden pre-activation, and
  recomputes the normalised input and gelu from them. Every parameter gradient of the MLP,
  fc2's included, is tied into the input gradient, so the backward pass frees the hidden arrays
  as soon as the layer is done.
  """
  y = _normalized(epsilon, dtype, x, scale, bias)
  return _affine(gelu.gelu(_affine(y, kernel1, bias1)), kernel2, bias2)


def _norm_mlp_forward(epsilon, dtype, x, scale, bias, kernel1, bias1, kernel2, bias2):
  y, mean, rstd = _norm_forward(epsilon, dtype, x, scale, bias)
  hidden = _affine(y, kernel1, bias1)
  out = _affine(gelu.training_value(hidden), kernel2, bias2)
  return out, ((x, mean, rstd, scale, bias), kernel1, hidden, kernel2)


def _norm_mlp_backward(epsilon, dtype, residuals, grad_out):
  del epsilon
  norm_residuals, kernel1, hidden, kernel2 = residuals
  grad_hidden, grad_kernel2, grad_bias2 = _gelu_dense_grads(hidden, kernel2, grad_out)
  grad_x, grad_scale, grad_bias, (grad_kernel1,), (grad_bias1,) = _norm_matmul_grads(
      norm_residuals, (kernel1,), (grad_hidden,), dtype)
  grad_x = after(grad_x, grad_scale, grad_bias, grad_kernel1, grad_bias1, grad_kernel2, grad_bias2)
  return grad_x, grad_scale, grad_bias, grad_kernel1, grad_bias1, grad_kernel2, grad_bias2


norm_mlp.defvjp(_norm_mlp_forward, _norm_mlp_backward)


class LayerNorm(nn.LayerNorm):
  """``nn.LayerNorm`` over the last axis (scale and bias) with the backward pass of :func:`layer_norm`.

  ``return_parameters=True`` returns ``(scale, bias)`` instead of normalising: the parameters for
  :func:`norm_dense` / :func:`norm_mlp`, created under this module's name as for a call.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, return_parameters: bool = False):
    if (mask is not None or self.reduction_axes != -1 or self.feature_axes != -1 or self.axis_name
        or not (self.use_scale and self.use_bias and self.use_fast_variance)):
      raise ValueError('layers.LayerNorm normalises over the last axis only, without a mask, with '
                       'scale and bias (flax defaults otherwise)')
    scale = self.param('scale', self.scale_init, (x.shape[-1],), self.param_dtype)
    bias = self.param('bias', self.bias_init, (x.shape[-1],), self.param_dtype)
    if return_parameters:
      return scale, bias
    return layer_norm(self.epsilon, self.dtype, x, scale, bias)
