"""Scaled dot-product attention whose backward pass recomputes the attention weights.

``jax.nn.dot_product_attention`` on CPU (its XLA implementation) differentiates through the
softmax, so the backward pass keeps the ``[B, H, T, T]`` weights and the exponentials of every
layer alive from the forward pass. Here the forward pass keeps only q, k, v and each query's
softmax maximum and normaliser; the backward pass recomputes the weights from them, as flash
attention does (Dao et al. 2022, without the tiling). Same values and gradients (float32 rounding
aside); for the MAE ViT-B/16 step at batch 8 on CPU, compiled temporaries fell from 1639 to
1313 MiB and the step got faster. The backward pass writes the recomputation differently from the
forward pass (``_backward``): written the same way, XLA merged the two and kept the forward's
scores and broadcasts alive after all; the step's temporaries fall by another ~140 MiB that way
(experiments/bench/RESULTS.md). Not differentiated, it normalises
after the product with the values (``_attend``), which is faster on CPU than jax.nn's program.

Layouts follow ``jax.nn.dot_product_attention``: q, k, v ``[B, T, H, D]``; ``mask`` broadcastable
to ``[B, H, T, S]`` (True = attend). Scores and softmax are float32 whatever the input dtype; the
matrix products take the inputs' dtype (bfloat16 stays bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np


def _masked(scores, mask):
  return scores if mask is None else jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


_TOKENS_FIRST = 'bqhd,bkhd->bhqk'  # q, k as [B, T, H, D]
_HEADS_FIRST = 'bhqd,bhkd->bhqk'  # q, k as [B, H, T, D]


def _scores(query, key, mask, layout=_TOKENS_FIRST):
  scores = jnp.einsum(layout, query, key, preferred_element_type=jnp.float32)
  return _masked(scores / np.sqrt(query.shape[-1]).astype(np.float32), mask)


def _exponentials(query, key, mask, layout=_TOKENS_FIRST):
  """(exp(scores - peak), per-query peak, per-query sum of the exponentials), the last two
  ``[B, H, T, 1]``; ``layout`` is the einsum of the scores. A custom VJP's forward is never
  differentiated, so neither is this."""
  scores = _scores(query, key, mask, layout)
  peak = scores.max(-1, keepdims=True)
  unnormalised = jnp.exp(scores - peak)
  return unnormalised, peak, unnormalised.sum(-1, keepdims=True)


def _attend(query, key, value, mask):
  """The forward pass without residuals: inference, extraction, ``predict``.

  Normalises after the product with the values, ``(exp(s - max) v) / sum``: the division runs
  over the output instead of the ``[B, H, T, S]`` weights, and XLA CPU fuses it into the copy that
  merges the heads. jax.nn's XLA program makes a separate pass over the weights; ViT-B/16's
  attention layer with its four projections, batch 8 on CPU, ran 1.2-1.3x faster this way
  (experiments/bench/RESULTS.md). Under differentiation, the same reordering made the forward +
  backward pass slower (0.87-0.93x), so ``_forward`` normalises the weights first.

  q, k and v are first laid out heads-first, ``[B, H, T, D]``, so that both products are plain
  batched matmuls over (B, H): the whole ViT-B/16 forward at batch 8 on CPU ran 1.085x faster
  (8 alternated rounds, 1.045-1.104). The training passes keep ``[B, T, H, D]``: the same layout
  there gave the MAE ViT-B/16 step 1.02x and the tiny one 0.97x (100 rounds).
  """
  query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  unnormalised, _, total = _exponentials(query, key, mask, _HEADS_FIRST)
  out = jnp.einsum('bhqk,bhkd->bhqd', unnormalised.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  return jnp.swapaxes(out / total, 1, 2).astype(value.dtype)


def _forward(query, key, value, mask):
  unnormalised, peak, total = _exponentials(query, key, mask)
  out = jnp.einsum('bhqk,bkhd->bqhd', (unnormalised / total).astype(value.dtype), value)
  # peak and total separately: peak + log(total) rounds back to peak when a query sees no key
  # (every score is finfo.min); the backward pass tells those queries by their peak.
  return out, (query, key, value, mask, peak, total)


def _backward(residuals, grad_out):
  query, key, value, mask, peak, total = residuals
  # The scores are recomputed from a scaled query, not as _scores' product of q and k: the same
  # expression as the forward pass's would be merged with it by XLA's common-subexpression
  # elimination, which keeps the forward's [B, H, T, S] scores alive until here. (An optimisation
  # barrier does not stop that on CPU: XLA CPU removes barriers before it.) The query takes the
  # power-of-two part of 1/sqrt(D), exact in any float format (bfloat16 included); the float32
  # scores take the rest.
  scale = 1.0 / np.sqrt(query.shape[-1])
  query_scale = 2.0 ** np.floor(np.log2(scale))
  rest = np.float32(scale / query_scale)
  scaled_query = query * np.asarray(query_scale, query.dtype)
  scores = _masked(
      jnp.einsum('bqhd,bkhd->bhqk', scaled_query, key, preferred_element_type=jnp.float32) * rest, mask)
  # exp(scores - peak) / total as one exponential, for the same reason: XLA CPU materialises the
  # forward pass's broadcasts of peak and 1 / total as [B, H, T, S] buffers, and would keep those.
  weights = jnp.exp(scores - (peak + jnp.log(total)))  # recomputed, never stored
  # A query that sees no key has peak = finfo.min, which absorbs log(total); its weights are 1 / S.
  weights = jnp.where(peak > jnp.finfo(jnp.float32).min, weights, 1.0 / scores.shape[-1])
  grad_value = jnp.einsum('bhqk,bqhd->bkhd', weights.astype(grad_out.dtype), grad_out)
  grad_weights = jnp.einsum('bqhd,bkhd->bhqk', grad_out, value, preferred_element_type=jnp.float32)
  # Softmax's VJP. sum_k weights * grad_weights equals <grad_out, out> per query in exact
  # arithmetic; summing it from the weights keeps sum_k grad_scores at rounding level, so the
  # key bias (which the softmax cannot see) gets no gradient, as with autodiff of the softmax.
  row_dot = (weights * grad_weights).sum(-1, keepdims=True)
  grad_scores = weights * (grad_weights - row_dot) * rest  # d loss / d (scaled_query . key)
  if mask is not None:  # masked scores are constants
    grad_scores = jnp.where(mask, grad_scores, 0.0)
  grad_scores = grad_scores.astype(query.dtype)
  grad_query = jnp.einsum('bhqk,bkhd->bqhd', grad_scores, key) * np.asarray(query_scale, query.dtype)
  grad_key = jnp.einsum('bhqk,bqhd->bkhd', grad_scores, scaled_query)
  return grad_query, grad_key, grad_value, None


@jax.custom_vjp
def dot_product_attention(query, key, value, mask=None):
  """softmax(q k^T / sqrt(D), masked) v, per head; see the module docstring."""
  return _attend(query, key, value, mask)


dot_product_attention.defvjp(_forward, _backward)
