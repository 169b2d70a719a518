"""ViT encoder: parameter counts of the standard sizes, the sin-cos table, timm parity."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affect_jax.models import vit


def numpy_variables(model, *args, seed=0):
  """Variables shaped like ``model.init(...)``, filled from numpy: compiling a Linen ``init``
  costs seconds on CPU, and these tests need arbitrary weights, not the initialisers."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(*args)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract)


def count_params(module, image_size):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes['params'])))


def test_vit_base_16_has_timm_parameter_count():
  # timm vit_base_patch16_224: 86,567,656 parameters, less the 768x1000 head (+1000 bias).
  learned = count_params(vit.VisionTransformer(posemb='learn'), 224)
  sincos = count_params(vit.VisionTransformer(posemb='sincos2d'), 224)
  assert learned == 86_567_656 - 769_000 == 85_798_656
  assert learned - sincos == 197 * 768 == 151_296


def test_presets_and_config_overrides():
  cfg = ml_collections.ConfigDict(dict(variant='L', patch_size=14, image_size=112, depth=2, dtype='bfloat16'))
  model = vit.vit_from_config(cfg)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (1024, 2, 16, 4096)
  assert model.patch_size == 14 and model.num_patches == 64 and model.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='variant'):
    vit.vit_from_config(ml_collections.ConfigDict(dict(variant='XXL')))


def test_sincos_table_known_values():
  table = vit.sincos_2d_posemb(8, 2)  # omega = [1, 1/100] per quarter
  assert table.shape == (5, 8)
  np.testing.assert_array_equal(table[0], 0.0)  # CLS slot
  # Patch 1 is row 0, column 1: the first half encodes the column, the second the row.
  expected = [np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01), 0.0, 0.0, 1.0, 1.0]
  np.testing.assert_allclose(table[2], expected, rtol=1e-6)
  expected_row1 = [0.0, 0.0, 1.0, 1.0, np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)]
  np.testing.assert_allclose(table[3], expected_row1, rtol=1e-6)


def test_outputs_blocks_named_by_depth_and_drop_path_is_train_only():
  model = vit.VisionTransformer(width=32, depth=3, num_heads=4, mlp_dim=64, patch_size=8, image_size=32,
                                drop_path=0.5, dropout=0.1)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = numpy_variables(model, jax.random.key(1), images)
  assert {f'blocks_{i}' for i in range(3)} <= set(variables['params'])
  apply = jax.jit(model.apply, static_argnames='train')
  out = apply(variables, images)
  assert out['cls'].shape == (2, 32) and out['patches'].shape == (2, 16, 32)
  np.testing.assert_array_equal(apply(variables, images)['cls'], out['cls'])
  train_a = apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  train_b = apply(variables, images, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(train_a['cls'], train_b['cls'])
  with pytest.raises(ValueError, match='expects images'):
    model.apply(variables, jnp.zeros((2, 64, 64, 3)))


def test_bfloat16_compute_keeps_float32_params():
  model = vit.VisionTransformer(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=8, image_size=32,
                                dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype('float32')}
  out = jax.eval_shape(model.apply, variables, jnp.ones((1, 32, 32, 3)))
  assert out['cls'].dtype == jnp.bfloat16


def test_rematerialised_forward_backward_finite():
  model = vit.VisionTransformer(**dict(vit.VIT_PRESETS['tiny'], depth=2), image_size=32, patch_size=16,
                                drop_path=0.1, remat=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)['params']

  def loss(p):
    out = model.apply({'params': p}, images, train=True, rngs={'dropout': jax.random.key(2)})
    return jnp.mean(out['cls'] ** 2) + jnp.mean(out['patches'] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(nn.unbox(grads))
  assert all(np.isfinite(g).all() for g in leaves)
  assert np.abs(np.asarray(nn.unbox(grads)['blocks_0']['mlp']['fc1']['kernel'])).sum() > 0


def test_matches_timm_vision_transformer():
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
      num_classes=0).eval()
  with torch.no_grad():  # O(1) activations, so that e.g. a tanh-approximate GELU would show (7e-4)
    for name, p in reference.named_parameters():
      norm_scale = 'norm' in name and name.endswith('weight')
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if norm_scale else 0.0))
  ours = vit.VisionTransformer(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32,
                               posemb='learn', layer_norm_eps=1e-6)
  params = vit.params_from_timm({k: v.numpy() for k, v in reference.state_dict().items()}, depth=2)
  init = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  params = vit.replace_params(init, params)
  images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_features(torch.from_numpy(images)).numpy()
  out = jax.jit(ours.apply)({'params': params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(out['cls'], expected[:, 0], atol=1e-5)
  np.testing.assert_allclose(out['patches'], expected[:, 1:], atol=1e-5)


def test_dropout_keep_mask_is_bernoulli_and_uncorrelated():
  # The mask hashes each element's index with two words drawn from the key: check the rate,
  # that neighbours along every axis and masks from split keys are uncorrelated, determinism in
  # the key, odd shapes and keep = 1.
  keep = 0.7
  shape = (64, 4, 300, 300)
  mask = np.asarray(vit.keep_mask(jax.random.key(0), keep, shape))
  tolerance = lambda n: 5 * np.sqrt(keep * (1 - keep) / n)
  assert abs(mask.mean() - keep) < tolerance(mask.size)
  for axis in range(4):
    head = np.take(mask, range(shape[axis] - 1), axis=axis).ravel().astype(float)
    tail = np.take(mask, range(1, shape[axis]), axis=axis).ravel().astype(float)
    assert abs(np.corrcoef(head, tail)[0, 1]) < 5 / np.sqrt(head.size), axis
  # Each row's rate: a hash with a weak bit would give rows of the wrong rate.
  rows = mask.reshape(-1, 300).mean(axis=1)
  assert abs(rows.std() - np.sqrt(keep * (1 - keep) / 300)) < 0.05 * np.sqrt(keep * (1 - keep) / 300)
  again = np.asarray(vit.keep_mask(jax.random.key(0), keep, shape))
  np.testing.assert_array_equal(mask, again)
  first, second = jax.random.split(jax.random.key(1))
  a = np.asarray(vit.keep_mask(first, keep, shape)).ravel().astype(float)
  b = np.asarray(vit.keep_mask(second, keep, shape)).ravel().astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
  assert abs(np.corrcoef(a, mask.ravel().astype(float))[0, 1]) < 5 / np.sqrt(a.size)
  odd = np.asarray(vit.keep_mask(jax.random.key(0), keep, (1000, 301)))
  assert odd.shape == (1000, 301)
  assert abs(odd.mean() - keep) < tolerance(odd.size)
  for rate in (0.1, 0.5, 0.9):
    small = np.asarray(vit.keep_mask(jax.random.key(2), rate, (2000, 1000)))
    assert abs(small.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / small.size), rate
  assert np.asarray(vit.keep_mask(jax.random.key(0), 1.0, (8, 4))).all()


_SHARDED_MASK = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from affect_jax.models import vit
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
key = jax.random.key(3)
full = np.asarray(vit.keep_mask(key, 0.6, (16, 8, 30)))
for spec in (P('data'), P(None, 'model'), P('data', 'model'), P(('data', 'model'))):
  sharded = jax.jit(lambda k: vit.keep_mask(k, 0.6, (16, 8, 30)), out_shardings=NamedSharding(mesh, spec))(key)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), full)
print('SAME')
"""


def test_dropout_keep_mask_is_the_same_under_sharding():
  # The mask is a function of the key and each element's global position: computed sharded over
  # 8 faked CPU devices it equals the one-device mask.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _SHARDED_MASK], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          check=False)
  assert result.returncode == 0 and 'SAME' in result.stdout, result.stderr[-2000:]


def test_dropout_scales_kept_values_and_is_identity_when_deterministic():
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (16, 128)), jnp.float32)
  layer = vit.Dropout(0.25)
  y = np.asarray(layer.apply({}, x, False, rngs={'dropout': jax.random.key(4)}))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.6 < kept.mean() < 0.9
  np.testing.assert_array_equal(np.asarray(layer.apply({}, x, True)), np.asarray(x))
