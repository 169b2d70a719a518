"""Per-frame classifier for fine-tuning and feature extraction.

Parameter tree: ``encoder/...`` (the same VisionTransformer tree as in the MAE,
so :func:`load_mae_encoder` copies it over) and ``head/{kernel, bias}``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax.models import partitioning as P
from affect_jax.models import vit

POOLS = ('cls', 'mean')


class FrameClassifier(nn.Module):
  """ViT encoder + linear head on one pooled feature per image.

  Attributes:
    encoder: the :class:`vit.VisionTransformer`.
    num_classes: head outputs.
    pool: 'cls' (the CLS token, what the paper's features use) or 'mean' (mean
      of the normalised patch tokens).
    head_dropout: dropout on the pooled feature before the head (train only).

  ``__call__(images [B,H,W,C], train) -> dict(logits [B, num_classes] float32,
  feature [B, D] float32)``; ``feature`` is the pooled vector before dropout,
  the per-frame feature the temporal stage consumes.
  """

  encoder: vit.VisionTransformer
  num_classes: int
  pool: str = 'cls'
  head_dropout: float = 0.0

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}')
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {self.num_classes}')
    self.head = vit.dense(self.num_classes, (P.EMBED, P.CLASSES), self.encoder.dtype, 'head',
                          kernel_init=nn.initializers.truncated_normal(0.02))
    self.dropout = nn.Dropout(self.head_dropout)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    tokens = self.encoder(images, train)
    feature = tokens['cls'] if self.pool == 'cls' else tokens['patches'].mean(axis=1)
    logits = self.head(self.dropout(feature, deterministic=not train))
    return dict(logits=logits.astype(jnp.float32), feature=feature.astype(jnp.float32))


def classifier_from_config(cfg: ml_collections.ConfigDict, num_classes: int) -> FrameClassifier:
  """Builds a :class:`FrameClassifier`; encoder keys as :func:`vit.vit_from_config`, plus
  pool ['cls' | 'mean'] and head_dropout [0]."""
  return FrameClassifier(
      encoder=vit.vit_from_config(cfg),
      num_classes=num_classes,
      pool=cfg.get('pool', 'cls'),
      head_dropout=float(cfg.get('head_dropout', 0.0)),
  )


def load_mae_encoder(classifier_params: Any, mae_params: Any,
                     encoder: vit.VisionTransformer | None = None) -> Any:
  """Returns ``classifier_params`` with its ``encoder`` subtree taken from ``mae_params``.

  Both trees are the ``params`` collection (boxed or not; boxes of the
  classifier tree are kept). When the classifier learns its position embedding
  but the MAE used the fixed sin-cos table (the official MAE fine-tuning
  recipe), ``pos_embed`` starts from that table; this needs ``encoder`` (the
  classifier's VisionTransformer) for the grid size. The head is left alone.

  Raises:
    ValueError: naming the first parameter whose name or shape differs.
  """
  if 'encoder' not in classifier_params or 'encoder' not in mae_params:
    raise ValueError("both parameter trees need an 'encoder' subtree (pass the 'params' collection)")
  source = dict(nn.unbox(mae_params['encoder']))
  target = classifier_params['encoder']
  if 'pos_embed' in target and 'pos_embed' not in source:
    if encoder is None or encoder.posemb != 'learn':
      raise ValueError('classifier learns pos_embed but the MAE has none: pass the classifier encoder '
                       'module (posemb="learn") to start it from the sin-cos table')
    source['pos_embed'] = np.asarray(vit.sincos_2d_posemb(encoder.width, encoder.grid_size))
  new = dict(classifier_params)
  new['encoder'] = vit.replace_params(target, source, 'params/encoder')
  return new
