"""Exact (erf) GELU whose backward pass recomputes its derivative from the input.

Differentiated by JAX, ``jax.nn.gelu(x, approximate=False)`` keeps, besides its input, the
pieces of its derivative (``exp(-x²/2)`` and the erf term) from the forward pass to the backward
pass: two more arrays of the MLP's hidden size per layer. Here the backward pass keeps only the
input and recomputes ``Φ(x) + x φ(x)`` from it, as PyTorch's GELU backward does. For the MAE
ViT-B/16 step at batch 8 on CPU the compiled temporaries fall by 176 MiB (1164 → 988 MiB with
only this change; experiments/bench/RESULTS.md). Same values and gradients as jax.nn's (float32
rounding aside).
"""

import jax
import jax.numpy as jnp
import numpy as np

_INV_SQRT2 = np.float32(1.0 / np.sqrt(2.0))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def _value(x: jax.Array) -> jax.Array:
  xf, cdf, _ = normal_cdf_pdf(x)
  return (xf * cdf).astype(x.dtype)


def training_value(x: jax.Array) -> jax.Array:
  """gelu(x) as the forward pass of a differentiated step computes it: jax.nn's ``erfc`` form.

  The backward pass recomputes Φ(x) with ``erf``; were the forward pass's value written with the
  same ``erf`` expression, XLA would merge the two and keep Φ(x) alive from the forward to the
  backward pass: the MAE ViT-B/16 step's compiled temporaries rose 647 → 728 MiB that way.
  """
  return jax.nn.gelu(x, approximate=False)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """x Φ(x), Φ the standard normal CDF (timm's nn.GELU(), HF's "gelu").

  Not differentiated (inference, extraction, ``predict``) it is ``x (1 + erf(x/√2)) / 2``:
  jax.nn.gelu's exact form goes through ``erfc``, which XLA CPU expands with an exponential; over
  ViT-B/16's MLP hidden layer at batch 8 ([8, 197, 3072] float32) 2.18 ms against 0.87 ms with
  ``erf``. The two differ by at most 1e-6 (experiments/bench/RESULTS.md). Differentiated, the
  forward pass uses :func:`training_value`.
  """
  return _value(x)


def _forward(x):
  return training_value(x), x


def normal_cdf_pdf(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x in float32, Φ(x), φ(x)): gelu(x) = x Φ(x) and its derivative Φ(x) + x φ(x)."""
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * _INV_SQRT2))
  return xf, cdf, _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)


def _backward(x, grad_out):
  xf, cdf, pdf = normal_cdf_pdf(x)
  return ((grad_out.astype(jnp.float32) * (cdf + xf * pdf)).astype(grad_out.dtype),)


gelu.defvjp(_forward, _backward)
