"""Temporal model: padded frames never influence real ones; masked BatchNorm; config reading."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affect_jax.models import temporal, vit

SMALL = dict(tcn_channels=(16, 8), tcn_dilations=(1, 2), tcn_kernel_size=5, proj_dim=16, num_layers=2,
             num_heads=2, ff_dim=32, head_hidden=8)
REAL, PAD, FEATURES = 10, 5, 12


def numpy_variables(model, *args, seed=0):
  """Variables shaped like ``model.init(...)``, filled from numpy.

  Compiling a Linen ``init`` costs seconds on CPU (one threefry kernel per
  parameter); these tests need arbitrary weights, not the initialisers.
  """
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == 'var':
      return np.ones(leaf.shape, leaf.dtype)
    if path[-1].key == 'mean':
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def segments(seed=0):
  """A real segment [2, REAL, F] and the same segment followed by PAD garbage frames."""
  x = jax.random.normal(jax.random.key(seed), (2, REAL, FEATURES))
  garbage = 50.0 * jax.random.normal(jax.random.key(seed + 1), (2, PAD, FEATURES))
  mask = jnp.ones((2, REAL), bool)
  padded_mask = jnp.concatenate([mask, jnp.zeros((2, PAD), bool)], axis=1)
  return x, mask, jnp.concatenate([x, garbage], axis=1), padded_mask


@pytest.mark.parametrize('options', [
    dict(tcn_causal=True, head_norm='batch', posemb='none'),
    dict(tcn_causal=False, head_norm='layer', posemb='sincos', norm_first=True),
])
def test_appended_padding_leaves_real_frames_unchanged(options):
  model = temporal.TemporalModel(num_outputs=3, **SMALL, **options)
  x, mask, padded, padded_mask = segments()
  variables = numpy_variables(model, x, mask)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, padded, padded_mask)[:, :REAL], apply(variables, x, mask),
                             atol=1e-6, rtol=1e-5)
  all_padding = apply(variables, x, jnp.zeros_like(mask))
  assert np.isfinite(all_padding).all()


def test_batchnorm_training_ignores_padded_frames():
  x, mask, padded, padded_mask = segments()
  # Without dropout, appending padding changes neither outputs nor the running statistics.
  model = temporal.TemporalModel(num_outputs=3, **SMALL, tcn_causal=False, dropout=0.0, attention_dropout=0.0)
  variables = numpy_variables(model, x, mask)
  train = jax.jit(lambda v, x, m: model.apply(v, x, m, train=True, mutable=['batch_stats'],
                                              capture_intermediates=True))
  (out, state), (padded_out, padded_state) = train(variables, x, mask), train(variables, padded, padded_mask)
  np.testing.assert_allclose(padded_out[:, :REAL], out, atol=1e-6, rtol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(padded_state['batch_stats']['head_norm'][key],
                               state['batch_stats']['head_norm'][key], atol=1e-6, rtol=1e-5)
  # The statistics are those of the real frames (PyTorch momentum 0.1 from mean 0 / var 1).
  hidden = np.asarray(padded_state['intermediates']['head_hidden']['__call__'][0])[:, :REAL].reshape(-1, 8)
  np.testing.assert_allclose(padded_state['batch_stats']['head_norm']['mean'], 0.1 * hidden.mean(0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(padded_state['batch_stats']['head_norm']['var'], 0.9 + 0.1 * hidden.var(0),
                             rtol=1e-4)

  # With dropout, real outputs depend on the dropout key but not on what the padded frames hold.
  model = temporal.TemporalModel(num_outputs=3, **SMALL, tcn_causal=False, dropout=0.3, tcn_dropout=0.2)
  other_garbage = padded.at[:, REAL:].set(-padded[:, REAL:] + 7.0)
  run = jax.jit(lambda x, key: model.apply(variables, x, padded_mask, train=True, mutable=['batch_stats'],
                                           rngs={'dropout': key})[0][:, :REAL])
  np.testing.assert_allclose(run(padded, jax.random.key(3)), run(other_garbage, jax.random.key(3)),
                             atol=1e-6, rtol=1e-5)
  assert not np.allclose(run(padded, jax.random.key(3)), run(padded, jax.random.key(4)))


def test_explicit_attention_path_matches_dot_product_attention():
  attention = vit.Attention(num_heads=2, attention_dropout=1e-9)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  key_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  variables = numpy_variables(attention, x, False, key_mask)
  apply = jax.jit(lambda v, x, m: attention.apply(v, x, False, m))
  fused = apply(variables, x, key_mask)
  explicit = jax.jit(lambda v, x, m: attention.apply(v, x, True, m, rngs={'dropout': jax.random.key(2)}))(
      variables, x, key_mask)
  np.testing.assert_allclose(explicit, fused, atol=1e-5)
  changed = x.at[0, 4:].set(100.0)
  np.testing.assert_allclose(apply(variables, changed, key_mask)[0, :4], fused[0, :4], atol=1e-5)
  changed = x.at[1, 4:].set(100.0)  # the second sample sees all keys
  assert not np.allclose(apply(variables, changed, key_mask)[1, :4], fused[1, :4], atol=1e-3)


def paper_config(**overrides):
  cfg = dict(tcn_channels=(256, 128, 128), tcn_kernel_size=5, tcn_dilations=(1, 2, 4), tcn_causal=True,
             tcn_weight_norm=True, tcn_activation='prelu', tcn_dropout=0.3, proj_dim=512, num_layers=8,
             num_heads=4, ff_dim=512, dropout=0.3, posemb='none', head_hidden=256, head_norm='batch',
             dtype='float32')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_from_config_reads_every_key_and_rejects_missing_ones():
  model = temporal.temporal_model_from_config(paper_config(dtype='bfloat16', norm_first=True), num_outputs=12)
  assert model.tcn_channels == (256, 128, 128) and model.tcn_dilations == (1, 2, 4)
  assert model.attention_dropout == 0.3 and model.norm_first and model.dtype == jnp.bfloat16
  assert model.num_outputs == 12 and model.head_norm == 'batch' and model.posemb == 'none'
  cfg = paper_config()
  del cfg['head_hidden']
  with pytest.raises(ValueError, match='head_hidden'):
    temporal.temporal_model_from_config(cfg, num_outputs=2)


def test_tiny_forward_backward_finite():
  model = temporal.temporal_model_from_config(paper_config(**dict(SMALL, num_layers=1)), num_outputs=2)
  x, mask, padded, padded_mask = segments()
  variables = jax.jit(model.init)(jax.random.key(2), padded, padded_mask)

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, padded, padded_mask, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.key(3)})
    return jnp.sum(jnp.where(padded_mask[:, :, None], out, 0.0) ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  grads = nn.unbox(grads)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads['tcn']['blocks_0']['conv1']['scale']).sum() > 0
  assert np.abs(grads['head_norm']['scale']).sum() > 0
