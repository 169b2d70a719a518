"""Logical axis names of every model parameter, and how they map onto the mesh.

Modules only ever name axes logically (``nn.with_logical_partitioning`` on
parameters, ``nn.with_logical_constraint`` on a few activations); the one
table :data:`LOGICAL_AXIS_RULES` decides which mesh axis ('data', 'fsdp',
'model') each name lands on. The trainer turns an abstract variable tree into
``NamedSharding``s with :func:`logical_shardings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'model')

# Parameter axes.
EMBED = 'embed'  # residual-stream width of a transformer (ViT, MAE decoder, temporal)
MLP = 'mlp'  # hidden width of a feed-forward block or of the temporal head
HEADS = 'heads'  # flattened heads x head_dim of the q/k/v projections
CLASSES = 'classes'  # output units of a prediction head
LENGTH = 'length'  # token / frame positions (learned position embedding)
PATCH_HEIGHT = 'patch_height'  # spatial taps of the patch-embedding convolution
PATCH_WIDTH = 'patch_width'
IMAGE_CHANNELS = 'image_channels'  # RGB channels entering the patch embedding
PIXELS = 'pixels'  # p*p*3 reconstructed pixels of one patch (MAE decoder output)
CONV_WIDTH = 'conv_width'  # temporal taps of a 1-D convolution
CHANNELS_IN = 'channels_in'  # input channels of a 1-D convolution / projection
CHANNELS = 'channels'  # output channels of a 1-D convolution
# Activation axes (used with nn.with_logical_constraint).
BATCH = 'batch'
ACTIVATION_LENGTH = 'activation_length'
ACTIVATION_EMBED = 'activation_embed'

# FSDP is data parallelism with sharded parameters, so the batch is split over
# both 'data' and 'fsdp'; the parameters' embedding dims are split over 'fsdp'.
# Tensor parallelism ('model') splits MLP hidden units, attention heads and
# prediction outputs. Everything else is replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ('data', 'fsdp')),
    (EMBED, 'fsdp'),
    (MLP, 'model'),
    (HEADS, 'model'),
    (CLASSES, 'model'),
    (LENGTH, None),
    (PATCH_HEIGHT, None),
    (PATCH_WIDTH, None),
    (IMAGE_CHANNELS, None),
    (PIXELS, None),
    (CONV_WIDTH, None),
    (CHANNELS_IN, None),
    (CHANNELS, None),
    (ACTIVATION_LENGTH, None),
    (ACTIVATION_EMBED, None),
)

LOGICAL_AXIS_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)


def _fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Replicates every dim whose size the assigned mesh axes do not divide.

  Small dims (2 VA outputs on a 4-way 'model' axis, a 3-channel kernel) cannot
  be split evenly; jit rejects such shardings, so they fall back to replicated.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = 1
    for name in names:
      ways *= mesh.shape[name]
    fitted.append(axes if dim % ways == 0 else None)
  return PartitionSpec(*fitted)


def logical_shardings(
    mesh: Mesh,
    abstract_variables: Any,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> Any:
  """NamedShardings for a boxed variable tree (e.g. from ``jax.eval_shape(model.init, ...)``).

  Leaves without logical names (BatchNorm statistics, plain arrays) are
  replicated. A dim that its mesh axes do not divide evenly is replicated.

  Args:
    mesh: the device mesh; its axis names must include those used in ``rules``.
    abstract_variables: variables as returned by ``init`` / ``eval_shape(init)``,
      still boxed in ``nn.LogicallyPartitioned``.
    rules: logical-name -> mesh-axis table.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``nn.unbox(abstract_variables)``.
  """
  specs = nn.get_partition_spec(abstract_variables)
  mesh_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.unbox(abstract_variables)
  return jax.tree.map(
      lambda sharding, leaf: NamedSharding(
          mesh, _fit_spec_to_shape(sharding.spec, leaf.shape, mesh)),
      mesh_shardings,
      shapes,
  )


def logical_axis_names_of(variables: Any) -> set[str]:
  """Every logical axis name used by the boxed leaves of ``variables``."""
  names: set[str] = set()
  for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    if isinstance(leaf, nn.LogicallyPartitioned):
      names.update(name for name in leaf.names if name is not None)
  return names
