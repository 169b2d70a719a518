"""FrameClassifier: pooling, and loading the encoder of a trained MAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affect_jax.models import classifier, mae, vit

ENCODER = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


def numpy_variables(model, *args, seed=0):
  """Variables shaped like ``model.init(...)``, filled from numpy: compiling a Linen ``init``
  costs seconds on CPU, and these tests need arbitrary weights, not the initialisers."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(*args)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract)


@pytest.fixture(scope='module')
def mae_params():
  model = mae.MaskedAutoencoder(encoder=vit.VisionTransformer(**ENCODER, posemb='sincos2d'),
                                decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)
  images = jnp.zeros((1, 32, 32, 3))
  return jax.jit(model.init)({'params': jax.random.key(7), 'mask': jax.random.key(8)}, images)['params']


def test_loaded_classifier_features_equal_the_mae_encoder(mae_params):
  def build(pool):
    return classifier.FrameClassifier(encoder=vit.VisionTransformer(**ENCODER, posemb='sincos2d'),
                                      num_classes=8, pool=pool)

  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  fresh = jax.jit(build('cls').init)(jax.random.key(1), images)['params']
  loaded = classifier.load_mae_encoder(fresh, mae_params)

  @jax.jit
  def forward(params, encoder_params):
    tokens = vit.VisionTransformer(**ENCODER, posemb='sincos2d').apply({'params': encoder_params}, images)
    return (build('cls').apply({'params': params}, images), build('mean').apply({'params': params}, images),
            tokens)

  cls_out, mean_out, tokens = forward(loaded, mae_params['encoder'])
  np.testing.assert_allclose(cls_out['feature'], tokens['cls'], atol=1e-6)
  np.testing.assert_allclose(mean_out['feature'], tokens['patches'].mean(axis=1), atol=1e-6)
  assert cls_out['logits'].shape == (3, 8) and cls_out['logits'].dtype == jnp.float32
  # The head is untouched and the encoder really changed.
  assert loaded['head'] is fresh['head']
  assert isinstance(loaded['encoder']['cls_token'], nn.LogicallyPartitioned)  # boxes kept
  np.testing.assert_array_equal(nn.unbox(loaded['encoder']['cls_token']), mae_params['encoder']['cls_token'].unbox())
  assert not np.allclose(nn.unbox(loaded['encoder']['cls_token']), nn.unbox(fresh['encoder']['cls_token']))


def test_learned_posemb_starts_from_the_mae_sincos_table(mae_params):
  learned = classifier.classifier_from_config(
      ml_collections.ConfigDict(dict(variant='tiny', **ENCODER, posemb='learn', head_dropout=0.5)), num_classes=2)
  fixed = classifier.FrameClassifier(encoder=vit.VisionTransformer(**ENCODER, posemb='sincos2d'), num_classes=2)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  learned_params = jax.jit(learned.init)(jax.random.key(1), images)['params']  # boxed
  with pytest.raises(ValueError, match='pass the classifier encoder'):
    classifier.load_mae_encoder(learned_params, mae_params)
  learned_params = classifier.load_mae_encoder(learned_params, mae_params, encoder=learned.encoder)
  fixed_params = classifier.load_mae_encoder(
      jax.eval_shape(fixed.init, jax.random.key(1), images)['params'], mae_params)
  fixed_params['head'] = learned_params['head']

  @jax.jit
  def features(learned_params, fixed_params):
    return (learned.apply({'params': learned_params}, images)['feature'],
            fixed.apply({'params': fixed_params}, images)['feature'])

  learned_feature, fixed_feature = features(learned_params, fixed_params)
  np.testing.assert_allclose(learned_feature, fixed_feature, atol=1e-6)


def test_mismatched_encoder_is_rejected_by_name(mae_params):
  wider = classifier.FrameClassifier(
      encoder=vit.VisionTransformer(**{**ENCODER, 'mlp_dim': 128}, posemb='sincos2d'), num_classes=2)
  params = jax.eval_shape(wider.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  with pytest.raises(ValueError, match=r'params/encoder/blocks_0/mlp/fc1/bias: shape \(64,\) does not match expected \(128,\)'):
    classifier.load_mae_encoder(params, mae_params)


def test_head_dropout_only_in_training():
  model = classifier.FrameClassifier(encoder=vit.VisionTransformer(**ENCODER), num_classes=4, head_dropout=0.9)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = numpy_variables(model, jax.random.key(1), images)
  apply = jax.jit(model.apply, static_argnames='train')
  eval_out = apply(variables, images)
  train_out = apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_allclose(train_out['feature'], eval_out['feature'], atol=1e-6)  # feature is pre-dropout
  assert not np.allclose(train_out['logits'], eval_out['logits'])
