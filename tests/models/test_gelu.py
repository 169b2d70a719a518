"""gelu.gelu against jax.nn.gelu(approximate=False) and the erf formula: values, gradients, memory."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from affect_jax.models import gelu

EXACT = functools.partial(jax.nn.gelu, approximate=False)


def test_values_match_the_erf_formula_and_jax():
  x = np.linspace(-8.0, 8.0, 1001).astype(np.float32)
  want = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
  np.testing.assert_allclose(gelu.gelu(jnp.asarray(x)), want, atol=2e-6)
  # jax.nn's exact form goes through erfc; ours through erf (faster on XLA CPU): equal to 1e-6.
  np.testing.assert_allclose(gelu.gelu(jnp.asarray(x)), EXACT(jnp.asarray(x)), atol=2e-6)


def test_gradient_matches_jax_and_the_closed_form():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 33)) * 3, jnp.float32)
  upstream = jnp.asarray(np.random.default_rng(1).standard_normal((64, 33)), jnp.float32)
  ours = jax.grad(lambda x: (gelu.gelu(x) * upstream).sum())(x)
  reference = jax.grad(lambda x: (EXACT(x) * upstream).sum())(x)
  np.testing.assert_allclose(ours, reference, atol=2e-6)
  x64 = np.asarray(x, np.float64)
  derivative = (0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
                + x64 * np.exp(-0.5 * x64**2) / math.sqrt(2.0 * math.pi))
  np.testing.assert_allclose(ours, np.asarray(upstream, np.float64) * derivative, atol=2e-6)


def test_bfloat16_stays_bfloat16():
  x = jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16)
  assert gelu.gelu(x).dtype == jnp.bfloat16
  grad = jax.grad(lambda x: gelu.gelu(x).astype(jnp.float32).sum())(x)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(jnp.float32),
                             jax.grad(lambda x: EXACT(x).sum())(x.astype(jnp.float32)), atol=2e-2)


def test_backward_keeps_only_the_input():
  """jax.nn's exact GELU keeps pieces of its derivative from the forward pass for the backward
  pass; ours keeps its input. A chain of GELUs differentiated: no temporaries at all for ours,
  at least one [256, 512] array per layer for jax.nn's."""
  h = jnp.asarray(np.random.default_rng(0).standard_normal((256, 512)), jnp.float32)
  layers = 6

  def temporaries(activation):
    def loss(h):
      for _ in range(layers):
        h = activation(h) * 0.5
      return h.sum()
    return jax.jit(jax.grad(loss)).lower(h).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(gelu.gelu) < h.nbytes
  assert temporaries(EXACT) >= layers * h.nbytes
