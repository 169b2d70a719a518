"""Full-size models trace and lower (no compilation, no arrays) on CPU."""

import jax
import jax.numpy as jnp
import ml_collections

from affect_jax.models import mae, temporal


def abstract(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_mae_vit_base_16_batch_1024_lowers():
  model = mae.mae_from_config(ml_collections.ConfigDict(dict(
      variant='B', patch_size=16, image_size=224, mask_ratio=0.75, decoder_width=512, decoder_depth=8,
      decoder_heads=16, norm_pix_loss=True, dtype='bfloat16')))
  images = abstract((1024, 224, 224, 3))
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'mask': jax.random.key(0)},
                                             jnp.zeros((1, 224, 224, 3))))['params']

  def loss_fn(params, images, key):
    mask_key, dropout_key = jax.random.split(key)
    out = model.apply({'params': params}, images, train=True, rngs={'mask': mask_key, 'dropout': dropout_key})
    return out['loss'], out['mask']

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  lowered = loss_and_grad.lower(params, images, jax.eval_shape(lambda: jax.random.key(0)))
  (loss, mask), grads = lowered.out_info
  assert loss.shape == () and loss.dtype == jnp.float32
  assert mask.shape == (1024, 196)
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
  # 49 visible patches + CLS go through the encoder, 197 tokens through the decoder.
  text = lowered.as_text()
  assert 'tensor<1024x50x768xbf16>' in text and 'tensor<1024x197x512xbf16>' in text


def test_temporal_paper_preset_batch_32_by_300_lowers():
  cfg = ml_collections.ConfigDict(dict(
      tcn_channels=(256, 128, 128), tcn_kernel_size=5, tcn_dilations=(1, 2, 4), tcn_causal=True,
      tcn_weight_norm=True, tcn_activation='prelu', tcn_dropout=0.3, proj_dim=512, num_layers=8, num_heads=4,
      ff_dim=512, dropout=0.3, posemb='none', head_hidden=256, head_norm='batch', dtype='float32'))
  model = temporal.temporal_model_from_config(cfg, num_outputs=12)
  features, mask = abstract((32, 300, 768)), abstract((32, 300), jnp.bool_)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 300, 768)),
                                                jnp.ones((1, 300), bool)))

  def loss_fn(params, batch_stats, features, mask, key):
    out, state = model.apply({'params': params, 'batch_stats': batch_stats}, features, mask, train=True,
                             rngs={'dropout': key}, mutable=['batch_stats'])
    return jnp.mean(jnp.where(mask[:, :, None], out, 0.0) ** 2), (out, state)

  lowered = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(
      variables['params'], variables['batch_stats'], features, mask, jax.eval_shape(lambda: jax.random.key(0)))
  (loss, (out, state)), _ = lowered.out_info
  assert out.shape == (32, 300, 12) and out.dtype == jnp.float32
  assert state['batch_stats']['head_norm']['mean'].shape == (256,)
