"""MAE: masking, loss, patch order, pictures, and parity with Hugging Face ViTMAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affect_jax.models import mae, vit


def tiny_mae(image_size=32, patch_size=8, dropout=0.0, norm_pix_loss=False, layer_norm_eps=1e-6):
  encoder = vit.VisionTransformer(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=patch_size,
                                  image_size=image_size, posemb='sincos2d', dropout=dropout,
                                  layer_norm_eps=layer_norm_eps)
  return mae.MaskedAutoencoder(encoder=encoder, decoder_width=16, decoder_depth=2, decoder_heads=2,
                               decoder_mlp_dim=48, norm_pix_loss=norm_pix_loss)


def numpy_variables(model, *args, seed=0):
  """Variables shaped like ``model.init(...)``, filled from numpy: compiling a Linen ``init``
  costs seconds on CPU, and these tests need arbitrary weights, not the initialisers."""
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(*args)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract)


def test_masking_keeps_49_of_196_per_sample_from_the_mask_stream():
  model = tiny_mae(image_size=224, patch_size=16, dropout=0.1)
  images = jax.random.normal(jax.random.key(0), (4, 224, 224, 3))
  variables = numpy_variables(model, {'params': jax.random.key(0), 'mask': jax.random.key(0)}, images)

  @jax.jit
  def masks(mask_key, dropout_key):
    out = model.apply(variables, images, train=True, rngs={'mask': mask_key, 'dropout': dropout_key})
    return out['mask'], out['ids_restore'], out['loss']

  mask, ids_restore, _ = masks(jax.random.key(1), jax.random.key(2))
  assert mask.shape == (4, 196)
  np.testing.assert_array_equal(np.sum(mask == 0, axis=1), [49] * 4)
  assert len({tuple(row) for row in np.asarray(mask)}) == 4  # samples are masked differently
  np.testing.assert_array_equal(np.sort(ids_restore, axis=1), np.tile(np.arange(196), (4, 1)))

  other_dropout = masks(jax.random.key(1), jax.random.key(3))
  np.testing.assert_array_equal(other_dropout[0], mask)
  assert other_dropout[2] != masks(jax.random.key(1), jax.random.key(2))[2]  # dropout did act
  assert not np.array_equal(masks(jax.random.key(4), jax.random.key(2))[0], mask)


def test_random_masking_follows_noise_like_hugging_face():
  tokens = jnp.arange(2 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 1)
  noise = jnp.array([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
  visible, mask, ids_restore = mae.random_masking(tokens, noise, mask_ratio=0.75)  # keeps int(8 * .25) = 2
  np.testing.assert_array_equal(visible[..., 0], [[1, 5], [8, 9]])  # lowest noise first
  np.testing.assert_array_equal(mask, [[1, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(ids_restore[0], np.argsort(np.argsort(noise[0])))


def test_loss_ignores_visible_patches_and_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 4, 8 * 8 * 3)).astype(np.float32)
  mask = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
  target = mae.patchify(jnp.asarray(images), 8)
  per_patch = ((pred - np.asarray(target)) ** 2).mean(-1)
  expected = (per_patch * mask).sum() / mask.sum()
  loss = mae.mae_loss(images, pred, mask, 8)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)

  changed_visible = pred + 100.0 * (1 - mask)[:, :, None]
  np.testing.assert_allclose(mae.mae_loss(images, changed_visible, mask, 8), loss, rtol=1e-7)
  changed_masked = pred + 1.0 * mask[:, :, None]
  assert abs(float(mae.mae_loss(images, changed_masked, mask, 8)) - float(loss)) > 0.1


def test_norm_pix_loss_uses_unbiased_per_patch_statistics():
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
  target = np.asarray(mae.patchify(jnp.asarray(images), 8))
  normed = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(mae.patch_targets(images, 8, norm_pix_loss=True), normed, rtol=1e-5, atol=1e-5)
  mask = np.ones((1, 4), np.float32)
  assert float(mae.mae_loss(images, normed, mask, 8, norm_pix_loss=True)) < 1e-10


def test_patchify_pixel_order_and_round_trip():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  patches = mae.patchify(images, 2)  # 2x2 grid of 2x2 patches
  assert patches.shape == (2, 4, 12)
  # Patch 1 is row 0, column 1; inside it pixels go row, column, channel ('nhwpqc').
  np.testing.assert_array_equal(patches[0, 1], np.concatenate(
      [images[0, 0, 2], images[0, 0, 3], images[0, 1, 2], images[0, 1, 3]]))
  np.testing.assert_array_equal(patches[1, 2, :3], images[1, 2, 0])
  np.testing.assert_array_equal(mae.unpatchify(patches, 2), images)


def test_reconstruct_images_pastes_hidden_patches_only():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
  mask = np.array([[1, 0, 0, 1]], np.float32)
  target = mae.patch_targets(images, 8, norm_pix_loss=True)
  pictures = mae.reconstruct_images(images, target, mask, 8, norm_pix_loss=True)
  # A perfect normalised prediction maps back to the image itself.
  np.testing.assert_allclose(pictures['reconstruction'], images, atol=1e-5)
  zeros = mae.reconstruct_images(images, jnp.zeros((1, 4, 192)), mask, 8)
  np.testing.assert_array_equal(zeros['pasted'][0, :8, 8:], images[0, :8, 8:])  # visible patch 1
  np.testing.assert_array_equal(zeros['pasted'][0, :8, :8], 0.0)  # hidden patch 0
  np.testing.assert_array_equal(zeros['masked'][0, 8:, 8:], 0.0)  # hidden patch 3


def test_tiny_mae_forward_backward_finite():
  model = mae.mae_from_config(ml_collections.ConfigDict(dict(
      variant='tiny', depth=2, image_size=32, patch_size=8, decoder_width=32, decoder_depth=1, decoder_heads=4,
      mask_ratio=0.5, norm_pix_loss=True)))
  assert model.encoder.posemb == 'sincos2d' and model.decoder_mlp_dim == 128
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = jax.jit(model.init)({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images)['params']

  def loss_fn(p):
    return model.apply({'params': p}, images, train=True, rngs={'mask': jax.random.key(2)})['loss']

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(loss) and loss > 0
  grads = nn.unbox(grads)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads['encoder']['blocks_0']['attn']['query']['kernel']).sum() > 0
  assert np.abs(grads['mask_token']).sum() > 0


def test_encoder_remat_also_rematerialises_the_decoder_blocks():
  def build(**kwargs):
    return mae.mae_from_config(ml_collections.ConfigDict(dict(
        variant='tiny', depth=2, image_size=32, patch_size=8, decoder_width=32, decoder_depth=3,
        decoder_heads=4, **kwargs)))

  plain, full, encoder_only = build(), build(remat=True), build(remat=True, decoder_remat=False)
  assert (full.decoder_remat, encoder_only.decoder_remat) == (None, False)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = numpy_variables(plain, {'params': jax.random.key(0), 'mask': jax.random.key(1)},
                              images)

  def loss_fn(model):
    return lambda p: model.apply({'params': p}, images, train=True,
                                 rngs={'mask': jax.random.key(2)})['loss']

  def residual_bytes(model):
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss_fn(model), p)[1], variables['params'])
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))

  # One rematerialised call per block: 2 encoder + 3 decoder, or the 2 encoder ones.
  def checkpoints(model):
    return str(jax.make_jaxpr(loss_fn(model))(variables['params'])).count('remat2[')

  assert (checkpoints(plain), checkpoints(encoder_only), checkpoints(full)) == (0, 2, 5)
  assert residual_bytes(full) < residual_bytes(encoder_only) < residual_bytes(plain)
  # Same parameters, same numbers: remat changes what is stored, not what is computed.
  reference = jax.jit(jax.value_and_grad(loss_fn(plain)))(variables['params'])
  for model in (encoder_only, full):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(model)))(variables['params'])
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def _hugging_face_reference(norm_pix_loss):
  """(torch, HF ViTMAEForPreTraining with O(1) random weights, our model, its params, pixels,
  noise): a 2 + 2 block MAE at 32x32 in patches of 8."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from transformers import ViTMAEConfig
  from transformers.models.vit_mae import modeling_vit_mae

  def hf_sincos(width, grid):
    if hasattr(modeling_vit_mae, 'get_2d_sincos_pos_embed'):  # transformers 4
      return torch.from_numpy(modeling_vit_mae.get_2d_sincos_pos_embed(width, grid, add_cls_token=True)).float()
    table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, width, cls_token=True)
    half = width // 2  # HF rotates the halves back to the official MAE layout
    return torch.cat([table[..., half:], table[..., :half]], dim=-1)

  np.testing.assert_allclose(hf_sincos(32, 4).numpy(), vit.sincos_2d_posemb(32, 4), atol=1e-7)
  config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                        decoder_num_attention_heads=2, decoder_intermediate_size=48,
                        norm_pix_loss=norm_pix_loss, mask_ratio=0.75)
  torch.manual_seed(0)
  reference = modeling_vit_mae.ViTMAEForPreTraining(config).eval()
  with torch.no_grad():  # O(1) activations (HF starts at N(0, 0.02)), then the fixed tables
    for name, p in reference.named_parameters():
      norm_scale = 'norm' in name and name.endswith('weight')
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if norm_scale else 0.0))
    reference.vit.embeddings.position_embeddings.copy_(hf_sincos(32, 4)[None])
    reference.decoder.decoder_pos_embed.copy_(hf_sincos(16, 4)[None])
  params = mae.params_from_hf_vit_mae({k: v.numpy() for k, v in reference.state_dict().items()})
  model = tiny_mae(norm_pix_loss=norm_pix_loss, layer_norm_eps=config.layer_norm_eps)
  init = jax.eval_shape(model.init, {'params': jax.random.key(0), 'mask': jax.random.key(0)},
                        jnp.zeros((1, 32, 32, 3)))['params']
  params = vit.replace_params(init, params)

  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  noise = rng.uniform(size=(3, 16)).astype(np.float32)
  return torch, reference, model, params, pixels, noise


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_matches_hugging_face_vit_mae(norm_pix_loss):
  torch, reference, model, params, pixels, noise = _hugging_face_reference(norm_pix_loss)
  with torch.no_grad():
    expected = reference(pixel_values=torch.from_numpy(pixels), noise=torch.from_numpy(noise))
  out = jax.jit(model.apply)({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                             noise=jnp.asarray(noise))
  np.testing.assert_array_equal(out['mask'], expected.mask.numpy())
  np.testing.assert_array_equal(out['ids_restore'], expected.ids_restore.numpy())
  np.testing.assert_allclose(out['pred'], expected.logits.numpy(), atol=1e-5)
  np.testing.assert_allclose(out['loss'], expected.loss.numpy(), rtol=1e-5)


def test_gradients_match_hugging_face_vit_mae():
  """Every parameter's gradient of the loss against PyTorch autograd through HF's ViTMAE (our
  blocks differentiate through custom backward passes: fused LayerNorms, recomputed attention
  weights and GELU)."""
  torch, reference, model, params, pixels, noise = _hugging_face_reference(norm_pix_loss=True)
  loss = reference(pixel_values=torch.from_numpy(pixels), noise=torch.from_numpy(noise)).loss
  loss.backward()
  grads_sd = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
              for name, p in reference.named_parameters()}
  expected = mae.params_from_hf_vit_mae(grads_sd)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  ours = jax.jit(jax.grad(lambda p: model.apply({'params': p}, images, noise=jnp.asarray(noise))['loss']))(nn.unbox(params))
  expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
  ours_by_path = dict(jax.tree_util.tree_leaves_with_path(ours))
  assert len(expected_leaves) == len(ours_by_path) > 30
  for path, value in expected_leaves:
    scale = max(float(np.abs(value).max()), 1e-2)  # key biases: zero up to rounding (softmax)
    np.testing.assert_allclose(ours_by_path[path], value, atol=2e-5 * scale, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
