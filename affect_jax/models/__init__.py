"""Models: ViT encoder, MAE, frame classifier, TCN + Transformer temporal model."""

from affect_jax.models.classifier import FrameClassifier, classifier_from_config, load_mae_encoder
from affect_jax.models.mae import MaskedAutoencoder, mae_from_config, mae_loss, reconstruct_images
from affect_jax.models.partitioning import LOGICAL_AXIS_RULES, logical_shardings
from affect_jax.models.temporal import TemporalModel, temporal_model_from_config
from affect_jax.models.vit import VIT_PRESETS, VisionTransformer, vit_from_config

__all__ = [
    'FrameClassifier', 'LOGICAL_AXIS_RULES', 'MaskedAutoencoder', 'TemporalModel', 'VIT_PRESETS',
    'VisionTransformer', 'classifier_from_config', 'load_mae_encoder', 'logical_shardings', 'mae_from_config',
    'mae_loss', 'reconstruct_images', 'temporal_model_from_config', 'vit_from_config',
]
