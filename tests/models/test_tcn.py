"""TCN: parity with a PyTorch reference block (weight norm, chomp, PReLU), causality, masking."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax.models import tcn


def test_weight_norm_starts_at_v_and_scales_per_output_channel():
  conv = tcn.Conv1D(features=4, kernel_size=3, dilation=1, causal=True, weight_norm=True)
  x = jax.random.normal(jax.random.key(0), (1, 6, 2))
  params = nn.unbox(conv.init(jax.random.key(1), x)['params'])
  v = params['kernel']
  np.testing.assert_allclose(params['scale'], np.sqrt((np.asarray(v) ** 2).sum(axis=(0, 1))), rtol=1e-6)
  plain = tcn.Conv1D(features=4, kernel_size=3, weight_norm=False).apply(
      {'params': {'kernel': v, 'bias': params['bias']}}, x)
  np.testing.assert_allclose(conv.apply({'params': params}, x), plain, atol=1e-7)
  scaled = dict(params, scale=params['scale'] * jnp.array([2.0, 1.0, 1.0, 0.5]))
  np.testing.assert_allclose(conv.apply({'params': scaled}, x), plain * jnp.array([2.0, 1.0, 1.0, 0.5]),
                             atol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_receptive_field(causal):
  model = tcn.TCN(channels=(3, 3), dilations=(1, 2), kernel_size=3, causal=causal, activation='gelu')
  x = jax.random.normal(jax.random.key(0), (1, 20, 2))
  variables = model.init(jax.random.key(1), x)
  jacobian = jax.jacobian(lambda x: model.apply(variables, x)[0, 10].sum())(x)[0]  # [T, C]
  depends_on = np.nonzero(np.abs(jacobian).sum(-1) > 0)[0]
  # Each block has two convs: reach (k-1)*d per conv = 2*2 + 2*4 = 12 frames.
  expected = np.arange(0, 11) if causal else np.arange(4, 17)
  np.testing.assert_array_equal(depends_on, expected)


def test_padded_frames_are_zero_and_do_not_leak_with_centred_padding():
  model = tcn.TCN(channels=(4, 4), dilations=(1, 2), kernel_size=5, causal=False, activation='prelu')
  x = jax.random.normal(jax.random.key(0), (2, 12, 3))
  variables = model.init(jax.random.key(1), x)
  garbage = 1e3 * jax.random.normal(jax.random.key(2), (2, 5, 3))
  padded = jnp.concatenate([x, garbage], axis=1)
  mask = jnp.arange(17)[None, :] < 12
  out = model.apply(variables, padded, jnp.broadcast_to(mask, (2, 17)))
  np.testing.assert_allclose(out[:, :12], model.apply(variables, x), atol=1e-6)
  np.testing.assert_array_equal(out[:, 12:], 0.0)


def test_block_matches_pytorch_reference():
  torch = pytest.importorskip('torch')
  k, d, c_in, c_out, length = 5, 2, 6, 4, 17
  torch.manual_seed(0)

  def wn_conv(c_in, c_out):
    conv = torch.nn.Conv1d(c_in, c_out, k, padding=(k - 1) * d, dilation=d)
    return torch.nn.utils.parametrizations.weight_norm(conv)

  conv1, conv2 = wn_conv(c_in, c_out), wn_conv(c_out, c_out)
  downsample = torch.nn.Conv1d(c_in, c_out, 1)
  act1, act2, act_out = (torch.nn.PReLU() for _ in range(3))
  with torch.no_grad():
    for conv in (conv1, conv2):  # make g differ from ||v|| so the formula is exercised
      conv.parametrizations.weight.original0.mul_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
    for act, slope in zip((act1, act2, act_out), (0.1, 0.2, 0.3)):
      act.weight.fill_(slope)

  def reference(x):  # x [B, C, T]; Chomp1d drops the right padding -> causal
    y = act1(conv1(x)[:, :, :length])
    y = act2(conv2(y)[:, :, :length])
    return act_out(y + downsample(x))

  def conv_params(conv):
    v = conv.parametrizations.weight.original1.detach().numpy()  # [out, in, k]
    g = conv.parametrizations.weight.original0.detach().numpy().reshape(-1)
    return dict(kernel=v.transpose(2, 1, 0), scale=g, bias=conv.bias.detach().numpy())

  params = dict(
      conv1=conv_params(conv1), conv2=conv_params(conv2),
      downsample=dict(kernel=downsample.weight.detach().numpy()[:, :, 0].T, bias=downsample.bias.detach().numpy()),
      act1=dict(slope=np.float32(0.1)), act2=dict(slope=np.float32(0.2)), act_out=dict(slope=np.float32(0.3)))
  block = tcn.TemporalBlock(features=c_out, kernel_size=k, dilation=d, causal=True, weight_norm=True,
                            activation='prelu')
  x = np.random.default_rng(0).normal(size=(2, length, c_in)).astype(np.float32)
  ours = block.apply({'params': params}, jnp.asarray(x), jnp.ones((2, length, 1)), False)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 2, 1))).numpy().transpose(0, 2, 1)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_identity_residual_and_config_errors():
  model = tcn.TCN(channels=(5, 5), dilations=(1, 2))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 3)))['params']
  assert 'downsample' in params['blocks_0'] and 'downsample' not in params['blocks_1']
  with pytest.raises(ValueError, match='one dilation per block'):
    tcn.TCN(channels=(5, 5), dilations=(1,)).init(jax.random.key(0), jnp.zeros((1, 8, 3)))
  with pytest.raises(ValueError, match='activation'):
    tcn.TCN(channels=(5,), dilations=(1,), activation='tanh').init(jax.random.key(0), jnp.zeros((1, 8, 3)))
