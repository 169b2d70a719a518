"""attention.dot_product_attention against jax.nn.dot_product_attention: values, gradients, memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.models import attention


def _inputs(dtype=jnp.float32, shape=(2, 7, 3, 4)):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


MASKS = {
    'none': None,
    'keys': np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], bool)[:, None, None, :],
    # the first query of sample 0 sees no key: the mean of the values, no gradient to q and k
    'full': np.random.default_rng(1).random((2, 3, 7, 7)) > 0.4,
}
MASKS['full'][0, :, 0, :] = False


@pytest.mark.parametrize('mask_name', sorted(MASKS))
def test_values_and_gradients_match_jax(mask_name):
  mask = MASKS[mask_name]
  query, key, value = _inputs()
  weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 3, 4)), jnp.float32)

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * weights).sum()

  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ours(query, key, value), reference(query, key, value), atol=2e-6)
  grads = jax.grad(loss(ours), (0, 1, 2))(query, key, value)
  expected = jax.grad(loss(reference), (0, 1, 2))(query, key, value)
  for got, want in zip(grads, expected):
    assert float(jnp.abs(want).max()) > 1e-2  # a real gradient, not zeros on both sides
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bfloat16_inputs_keep_bfloat16_outputs_and_gradients():
  query, key, value = _inputs(jnp.bfloat16)
  out = attention.dot_product_attention(query, key, value)
  assert out.dtype == jnp.bfloat16
  reference = attention.dot_product_attention(*(x.astype(jnp.float32) for x in (query, key, value)))
  np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=3e-2)
  grads = jax.grad(lambda q, k, v: attention.dot_product_attention(q, k, v).astype(jnp.float32).sum(),
                   (0, 1, 2))(query, key, value)
  assert all(g.dtype == jnp.bfloat16 for g in grads)


def test_backward_keeps_no_attention_weights():
  """The residuals of the backward pass are [B, T, H, D]-sized, never [B, H, T, T]."""
  query, key, value = _inputs(shape=(2, 64, 2, 4))
  weights_size = 2 * 2 * 64 * 64

  def residual_sizes(fn):
    _, vjp = jax.vjp(fn, query, key, value)
    return [x.size for x in jax.tree_util.tree_leaves(vjp)]

  assert max(residual_sizes(lambda q, k, v: attention.dot_product_attention(q, k, v))) < weights_size
  assert max(residual_sizes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))) >= weights_size


def _divides(fn, *args):
  """Output sizes of the divisions by an array (not by a scalar such as the 1/sqrt(D) scale) in
  fn's jaxpr, nested jaxprs included."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'div' and eqn.invars[1].aval.shape:
        yield eqn.outvars[0].aval.size
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            yield from walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            yield from walk(sub)
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_inference_normalises_the_output_not_the_weights():
  """Not differentiated, the division runs over [B, T, H, D], never over the [B, H, T, S] weights."""
  query, key, value = _inputs(shape=(2, 64, 2, 4))
  weights_size = 2 * 2 * 64 * 64
  ours = _divides(attention.dot_product_attention, query, key, value)
  assert ours and max(ours) <= query.size
  assert max(_divides(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), query, key, value)) >= weights_size


def test_backward_recomputes_the_scores_in_the_compiled_program():
  """XLA must not merge the backward pass's scores with the forward pass's (common-subexpression
  elimination would keep the forward's [B, H, T, S] scores alive until the backward pass): the
  compiled gradient has three [B, H, T, S] products (scores, recomputed scores, gradient of the
  weights); jax.nn's and a backward written like the forward have two."""
  query, key, value = _inputs(shape=(2, 64, 2, 8))

  def products(fn):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.tanh(fn(q, k, v)).sum(), (0, 1, 2)))
    text = grad.lower(query, key, value).compile().as_text()
    return len(re.findall(r'= f32\[2,2,64,64\]\{[0-9,]*\} dot\(', text))

  assert products(attention.dot_product_attention) == 3
  assert products(jax.nn.dot_product_attention) == 2


def test_bfloat16_gradients_as_accurate_as_jax():
  """bfloat16 inputs, head size 32 (1/sqrt(32) is not a power of two): the gradients are as close
  to float32's as jax.nn's bfloat16 gradients are (the recomputation scales the query by a power
  of two only, exact in bfloat16; scaling it by 1/sqrt(32) in bfloat16 made the error 1.4x)."""
  rng = np.random.default_rng(0)
  query, key, value = (jnp.asarray(rng.standard_normal((4, 128, 4, 32)) * 1.5, jnp.float32)
                       for _ in range(3))
  weights = jnp.asarray(rng.standard_normal((4, 128, 4, 32)), jnp.float32)

  def grads(fn, dtype):
    loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * weights).sum()
    return jax.grad(loss, (0, 1, 2))(*(x.astype(dtype) for x in (query, key, value)))

  exact = grads(jax.nn.dot_product_attention, jnp.float32)

  def errors(fn):
    return [float(jnp.linalg.norm(g.astype(jnp.float32) - e) / jnp.linalg.norm(e))
            for g, e in zip(grads(fn, jnp.bfloat16), exact)]

  for ours, reference in zip(errors(attention.dot_product_attention),
                             errors(jax.nn.dot_product_attention)):
    assert ours < 1.1 * reference, (ours, reference)
