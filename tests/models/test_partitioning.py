"""Logical axis names on every parameter, the rules table, and sharded execution on 8 fake devices."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from affect_jax.models import classifier, mae, partitioning, temporal, vit

TINY_VIT = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


@functools.lru_cache(maxsize=None)
def abstract_variables():
  key = jax.random.key(0)
  images = jnp.zeros((2, 32, 32, 3))
  features, mask = jnp.zeros((2, 6, 16)), jnp.ones((2, 6), bool)
  mae_model = mae.MaskedAutoencoder(encoder=vit.VisionTransformer(**TINY_VIT, posemb='sincos2d'),
                                    decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)
  cls_model = classifier.FrameClassifier(encoder=vit.VisionTransformer(**TINY_VIT, posemb='learn'), num_classes=8)
  models = {
      'mae': (mae_model, ({'params': key, 'mask': key}, images)),
      'classifier': (cls_model, (key, images)),
      'temporal_batch': (temporal.TemporalModel(num_outputs=2, tcn_channels=(8, 8), tcn_dilations=(1, 2), proj_dim=16, num_heads=2,
                                                ff_dim=16, num_layers=1, head_hidden=8), (key, features, mask)),
      'temporal_layer': (temporal.TemporalModel(num_outputs=2, tcn_channels=(8, 4), tcn_dilations=(1, 2), proj_dim=16, num_heads=2,
                                                ff_dim=16, num_layers=1, head_hidden=8, head_norm='layer',
                                                norm_first=True, tcn_weight_norm=False, tcn_activation='gelu'),
                         (key, features, mask)),
  }
  return {name: jax.eval_shape(lambda m=m, a=a: m.init(*a)) for name, (m, a) in models.items()}


@pytest.mark.parametrize('name', ['mae', 'classifier', 'temporal_batch', 'temporal_layer'])
def test_every_parameter_has_logical_names_covered_by_the_rules(name):
  params = abstract_variables()[name]['params']
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f'{where} has no logical axis names'
    assert len(leaf.names) == leaf.value.ndim, f'{where}: names {leaf.names} for shape {leaf.value.shape}'
  used = partitioning.logical_axis_names_of(params)
  assert used <= partitioning.LOGICAL_AXIS_NAMES, used - partitioning.LOGICAL_AXIS_NAMES
  assert {'embed', 'mlp'} <= used


def test_rules_map_onto_the_three_mesh_axes():
  rules = dict(partitioning.LOGICAL_AXIS_RULES)
  assert rules['batch'] == ('data', 'fsdp') and rules['embed'] == 'fsdp'
  assert rules['mlp'] == rules['heads'] == rules['classes'] == 'model'
  mesh_axes = set()
  for value in rules.values():
    mesh_axes.update((value,) if isinstance(value, str) else value or ())
  assert mesh_axes == set(partitioning.MESH_AXES)


SHARDED_SCRIPT = r'''
import json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as PS
from affect_jax.models import mae, partitioning, temporal, vit

assert jax.device_count() == 8
mesh = jax.make_mesh((2, 2, 2), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
result = {}
def spec(sharding):
  return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]

# Full-size MAE: parameter specs only (no arrays).
big = mae.MaskedAutoencoder(encoder=vit.VisionTransformer(posemb='sincos2d'))
abstract = jax.eval_shape(lambda: big.init({'params': jax.random.key(0), 'mask': jax.random.key(0)},
                                           jnp.zeros((1, 224, 224, 3))))
specs = partitioning.logical_shardings(mesh, abstract)['params']
result['fc1'] = spec(specs['encoder']['blocks_0']['mlp']['fc1']['kernel'])
result['query'] = spec(specs['encoder']['blocks_11']['attn']['query']['kernel'])
result['patch_embed'] = spec(specs['encoder']['patch_embed']['kernel'])
result['decoder_pred'] = spec(specs['decoder_pred']['kernel'])

def run(model, init_args, loss_fn, batch):
  """Sharded init + loss/grad on the mesh; the same on one device; max abs difference."""
  abstract = jax.eval_shape(lambda: model.init(*init_args))
  shardings = partitioning.logical_shardings(mesh, abstract)
  batch_sharding = NamedSharding(mesh, PS(('data', 'fsdp')))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    variables = jax.jit(model.init, out_shardings=shardings)(*init_args)
    sharded_batch = jax.device_put(batch, batch_sharding)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables, sharded_batch)
  local = jax.device_get(variables)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(local, jax.device_get(batch))
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(nn.unbox(grads)), jax.tree.leaves(nn.unbox(ref_grads))))
  return variables, float(loss), float(ref_loss), diff

tiny = mae.MaskedAutoencoder(
    encoder=vit.VisionTransformer(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=8, image_size=32,
                                  posemb='sincos2d'),
    decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)
images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
def mae_loss(variables, images):
  return tiny.apply(variables, images, train=True, rngs={'mask': jax.random.key(2)})['loss']
variables, loss, ref_loss, diff = run(
    tiny, ({'params': jax.random.key(0), 'mask': jax.random.key(0)}, images[:1]), mae_loss, images)
result['mae'] = [loss, ref_loss, diff]
result['mae_fc1_sharding'] = spec(nn.unbox(variables)['params']['encoder']['blocks_0']['mlp']['fc1']['kernel'].sharding)

tm = temporal.TemporalModel(num_outputs=3, tcn_channels=(8, 8), tcn_dilations=(1, 2), proj_dim=16,
                            num_layers=1, num_heads=2, ff_dim=16, head_hidden=8, dropout=0.0,
                            attention_dropout=0.0, tcn_causal=False)
features = jax.random.normal(jax.random.key(3), (8, 12, 16))
mask = jnp.arange(12)[None, :] < jnp.array([12, 9, 5, 12, 1, 12, 7, 3])[:, None]
def temporal_loss(variables, batch):
  features, mask = batch
  out, _ = tm.apply(variables, features, mask, train=True, mutable=['batch_stats'])
  return jnp.sum(jnp.where(mask[:, :, None], out, 0.0) ** 2) / jnp.sum(mask)
variables, loss, ref_loss, diff = run(tm, (jax.random.key(0), features, mask), temporal_loss, (features, mask))
result['temporal'] = [loss, ref_loss, diff]
result['head_out_bias'] = spec(nn.unbox(variables)['params']['head_out']['bias'].sharding)
print('RESULT' + json.dumps(result))
'''


@pytest.mark.slow
def test_sharded_init_and_step_match_single_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.split('RESULT', 1)[1])
  assert result['fc1'] == result['query'] == result['mae_fc1_sharding'] == ['fsdp', 'model']
  assert result['patch_embed'] == [None, None, None, 'fsdp']
  assert result['decoder_pred'] == ['fsdp', None]
  assert result['head_out_bias'] == [None]  # 3 outputs do not split over 'model'
  for name in ('mae', 'temporal'):
    loss, ref_loss, grad_diff = result[name]
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss)), (name, loss, ref_loss)
    assert grad_diff < 5e-5, (name, grad_diff)
