"""PyTorch sides of the benchmarks: Hugging Face ViT / ViTMAE configured like our models, and a
`torch.nn` port of the temporal model (TCN -> 1x1 projection -> Transformer -> per-frame head).

The ViT weights are shared with ours through `affect_jax.tools.import_torch` (the converter users
run), so both sides are the same architecture with the same parameters; `max_abs_diff` checks it.
"""

import numpy as np
import torch
from torch import nn
import transformers

from affect_jax.models import vit
from affect_jax.tools import import_torch


def hf_vit_config(variant, image_size, patch_size):
  sizes = vit.VIT_PRESETS[variant]
  return dict(hidden_size=sizes["width"], num_hidden_layers=sizes["depth"],
              num_attention_heads=sizes["num_heads"], intermediate_size=sizes["mlp_dim"],
              image_size=image_size, patch_size=patch_size, hidden_act="gelu",
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)


def hf_vit(variant, image_size, patch_size):
  """transformers' ViTModel (no pooler), eval mode."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(**hf_vit_config(variant, image_size, patch_size))
  return transformers.ViTModel(config, add_pooling_layer=False).eval()


def hf_vit_mae(model_cfg):
  """transformers' ViTMAEForPreTraining with the sizes of our MAE config `model_cfg`."""
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(
      **hf_vit_config(model_cfg.variant, model_cfg.image_size, model_cfg.patch_size),
      decoder_hidden_size=model_cfg.decoder_width, decoder_num_hidden_layers=model_cfg.decoder_depth,
      decoder_num_attention_heads=model_cfg.decoder_heads,
      decoder_intermediate_size=4 * model_cfg.decoder_width, mask_ratio=model_cfg.mask_ratio,
      norm_pix_loss=model_cfg.norm_pix_loss)
  for key in ("width", "depth", "num_heads", "mlp_dim"):  # smoke sizes override the preset
    if model_cfg.get(key, None) is not None:
      raise ValueError("hf_vit_mae takes preset sizes only")
  return transformers.ViTMAEForPreTraining(config).train()


def our_params(torch_model):
  """Our parameters for `torch_model` (HF ViT or ViTMAE), through the package's converter."""
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  imported = import_torch.convert_state_dict(state, layout="hf", hf_config=torch_model.config.to_dict())
  return imported.params, imported.model


# --- the temporal model in torch.nn ----------------------------------------------------------------


class Conv1d(nn.Module):
  """Dilated causal (or centred) convolution with weight norm, on [B, C, T]."""

  def __init__(self, cin, cout, kernel_size, dilation, causal):
    super().__init__()
    total = (kernel_size - 1) * dilation
    self.pad = (total, 0) if causal else (total // 2, total - total // 2)
    self.conv = nn.utils.parametrizations.weight_norm(
        nn.Conv1d(cin, cout, kernel_size, dilation=dilation))

  def forward(self, x):
    return self.conv(nn.functional.pad(x, self.pad))


class TemporalBlock(nn.Module):

  def __init__(self, cin, cout, kernel_size, dilation, causal, dropout):
    super().__init__()
    self.conv1 = Conv1d(cin, cout, kernel_size, dilation, causal)
    self.conv2 = Conv1d(cout, cout, kernel_size, dilation, causal)
    self.act1, self.act2, self.act_out = nn.PReLU(), nn.PReLU(), nn.PReLU()
    self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
    self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

  def forward(self, x, mask):
    y = self.drop1(self.act1(self.conv1(x))) * mask
    y = self.drop2(self.act2(self.conv2(y))) * mask
    residual = x if self.downsample is None else self.downsample(x)
    return self.act_out(y + residual) * mask


class TemporalModel(nn.Module):
  """The paper's temporal model with our config's sizes (`configs.common.PAPER_TEMPORAL`)."""

  def __init__(self, cfg, feature_dim, num_outputs):
    super().__init__()
    channels = [feature_dim] + list(cfg.tcn_channels)
    self.tcn = nn.ModuleList([
        TemporalBlock(channels[i], channels[i + 1], cfg.tcn_kernel_size, d, cfg.tcn_causal, cfg.tcn_dropout)
        for i, d in enumerate(cfg.tcn_dilations)])
    self.input_proj = nn.Linear(channels[-1], cfg.proj_dim)
    layer = nn.TransformerEncoderLayer(cfg.proj_dim, cfg.num_heads, cfg.ff_dim, cfg.dropout,
                                       activation="relu", batch_first=True, norm_first=False)
    self.transformer = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
    self.head_hidden = nn.Linear(cfg.proj_dim, cfg.head_hidden)
    self.head_norm = nn.BatchNorm1d(cfg.head_hidden)
    self.head_drop = nn.Dropout(cfg.dropout)
    self.head_out = nn.Linear(cfg.head_hidden, num_outputs)

  def forward(self, features, frame_mask):
    mask = frame_mask[:, None, :].to(features.dtype)
    x = features.transpose(1, 2) * mask
    for block in self.tcn:
      x = block(x, mask)
    x = self.input_proj(x.transpose(1, 2))
    x = self.transformer(x, src_key_padding_mask=~frame_mask)
    x = self.head_hidden(x)
    # BatchNorm statistics over real frames only, as ours.
    real = x[frame_mask]
    x = x.masked_scatter(frame_mask[:, :, None], self.head_norm(real))
    x = self.head_drop(torch.relu(x))
    return self.head_out(x)


def ccc_loss(pred, target, valid, eps=1e-8):
  """1 - CCC per dimension over all valid frames of the batch (affect_jax.losses.ccc_loss)."""
  w = valid.reshape(-1, 1).to(pred.dtype)
  p = pred.reshape(-1, pred.shape[-1]) * w
  t = target.reshape(-1, target.shape[-1]) * w
  n = w.sum().clamp_min(1.0)
  mp, mt = p.sum(0) / n, t.sum(0) / n
  vp = ((p - mp) ** 2 * w).sum(0) / n
  vt = ((t - mt) ** 2 * w).sum(0) / n
  cov = ((p - mp) * (t - mt) * w).sum(0) / n
  return (1 - 2 * cov / (vp + vt + (mp - mt) ** 2 + eps)).mean()


def max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
