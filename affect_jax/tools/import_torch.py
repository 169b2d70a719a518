r"""Converts public PyTorch ViT / MAE weights into affect_jax parameters.

  python -m affect_jax.tools.import_torch CKPT OUT [--num_heads=N] [--decoder_num_heads=N]

CKPT is one of
  * a Hugging Face model folder (``save_pretrained``): ``ViTMAEForPreTraining`` (encoder + decoder),
    ``ViTMAEModel``, ``ViTModel`` or ``ViTFor...`` (encoder only), transformers 4 or 5 key names;
  * an official MAE checkpoint (``{'model': state_dict}``, keys ``patch_embed.proj.weight``,
    ``blocks.0.attn.qkv.weight``, ``decoder_embed.weight``, ...; the decoder is optional);
  * a timm ``VisionTransformer`` state dict (same encoder keys, learned ``pos_embed``).
Files may be ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``) or ``.safetensors``.

OUT becomes a folder that every stage accepts as ``init_from`` (and that
``checkpointing.restore_params(OUT/checkpoints)`` reads): an Orbax checkpoint ``OUT/checkpoints/0``
whose ``state`` item is ``{'params': {'encoder': ..., [decoder parameters]}}``, plus
``OUT/import.json`` with the model settings the weights need (``--config.model.*`` overrides) and
the key report. The parameters are checked against our module built with those settings: a missing
parameter or a shape mismatch is an error; checkpoint keys that were not used are listed.

Position tables: the official MAE and HF ViTMAE store fixed 2-D sin-cos tables; when the
checkpoint's table equals ours it is dropped (``posemb='sincos2d'``), otherwise it is kept as a
learned ``pos_embed`` (``posemb='learn'``, as timm and HF ViT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from affect_jax.models import mae as mae_lib
from affect_jax.models import vit

# Heads of the standard ViT widths (head dimension 64, except ViT-H: 16 heads of 80).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# The official MAE decoders: 512 wide with 16 heads.
STANDARD_DECODER_HEADS = {512: 16}
POSEMB_ATOL = 1e-5

LAYOUTS = ("hf", "mae", "timm")


class ConversionError(ValueError):
  """The checkpoint cannot become our parameters (missing keys, wrong shapes, unknown layout)."""


class TrackedStateDict(Mapping):
  """A read-only state dict that remembers which keys were read."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], where: str):
    self._data = dict(state_dict)
    self.where = where
    self.used: set[str] = set()

  def __getitem__(self, key):
    if key not in self._data:
      raise ConversionError(f"{self.where}: key {key!r} is missing from the checkpoint")
    self.used.add(key)
    return self._data[key]

  def __contains__(self, key):
    return key in self._data

  def __iter__(self):
    return iter(self._data)

  def __len__(self):
    return len(self._data)

  def drop(self, key):
    """Marks `key` as deliberately not converted (e.g. a fixed table we recompute)."""
    self.used.add(key)

  def unused(self):
    return sorted(set(self._data) - self.used)


@dataclasses.dataclass
class Imported:
  """A converted checkpoint: parameters, the model settings they need, and the key report."""
  params: dict[str, Any]
  model: dict[str, Any]
  layout: str
  source: str
  dropped: list[str]
  unknown: list[str]

  def report(self) -> dict[str, Any]:
    return dict(source=self.source, layout=self.layout, model=self.model, dropped_keys=self.dropped,
                unknown_keys=self.unknown)


# --- reading ------------------------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(value, torch.Tensor):
    return value.detach().to(torch.float32).cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
  return np.asarray(value)


def _read_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v
              for k, v in load_file(path).items()}
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
  for key in ("model", "state_dict", "model_state", "module"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  state_dict = {}
  for key, value in obj.items():
    if hasattr(value, "shape"):
      state_dict[re.sub(r"^(module\.|_orig_mod\.)+", "", key)] = _to_numpy(value)
  return state_dict


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(state dict as float32 numpy, HF config dict or None) of a file or a HF model folder."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or folder")
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    hf_config = None
    if os.path.exists(config_path):
      with open(config_path) as f:
        hf_config = json.load(f)
    names = sorted(os.listdir(path))
    weights = [n for n in names if n.endswith(".safetensors")] or [
        n for n in names if n.endswith((".bin", ".pth", ".pt"))]
    if not weights:
      raise ConversionError(f"{path}: a folder without *.safetensors / *.bin / *.pth weights")
    state_dict = {}
    for name in weights:
      state_dict.update(_read_file(os.path.join(path, name)))
    return state_dict, hf_config
  return _read_file(path), None


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'hf' (Hugging Face ViT / ViTMAE), 'mae' (official MAE, with decoder) or 'timm'."""
  keys = set(state_dict)
  if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
    return "hf"
  if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
    return "mae" if "decoder_embed.weight" in keys else "timm"
  sample = sorted(keys)[:8]
  raise ConversionError(f"Unknown checkpoint layout (first keys {sample}); expected a Hugging Face ViT/ViTMAE, "
                        "official MAE or timm VisionTransformer state dict")


# --- conversion ---------------------------------------------------------------------------------


def _linear(sd, key):
  return dict(kernel=np.ascontiguousarray(sd[f"{key}.weight"].T), bias=sd[f"{key}.bias"])


def _norm(sd, key):
  return dict(scale=sd[f"{key}.weight"], bias=sd[f"{key}.bias"])


def _timm_block(sd, prefix):
  width = sd[f"{prefix}.attn.proj.weight"].shape[0]
  qkv_w, qkv_b = sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"]
  if qkv_w.shape != (3 * width, width):
    raise ConversionError(f"{sd.where}: {prefix}.attn.qkv.weight has shape {qkv_w.shape}, "
                          f"expected {(3 * width, width)}")
  attn = {name: dict(kernel=np.ascontiguousarray(qkv_w[j * width:(j + 1) * width].T),
                     bias=qkv_b[j * width:(j + 1) * width])
          for j, name in enumerate(("query", "key", "value"))}
  attn["proj"] = _linear(sd, f"{prefix}.attn.proj")
  return dict(norm1=_norm(sd, f"{prefix}.norm1"), attn=attn, norm2=_norm(sd, f"{prefix}.norm2"),
              mlp=dict(fc1=_linear(sd, f"{prefix}.mlp.fc1"), fc2=_linear(sd, f"{prefix}.mlp.fc2")))


# transformers 5 names first, then transformers 4 names.
_HF_BLOCK_NAMES = dict(
    query=("attention.q_proj", "attention.attention.query"),
    key=("attention.k_proj", "attention.attention.key"),
    value=("attention.v_proj", "attention.attention.value"),
    proj=("attention.o_proj", "attention.output.dense"),
    fc1=("mlp.fc1", "intermediate.dense"),
    fc2=("mlp.fc2", "output.dense"),
)


def _hf_block(sd, prefix):
  def linear(name):
    for candidate in _HF_BLOCK_NAMES[name]:
      if f"{prefix}.{candidate}.weight" in sd:
        return _linear(sd, f"{prefix}.{candidate}")
    raise ConversionError(f"{sd.where}: none of {[f'{prefix}.{c}.weight' for c in _HF_BLOCK_NAMES[name]]} "
                          "in the checkpoint")

  return dict(norm1=_norm(sd, f"{prefix}.layernorm_before"),
              attn={n: linear(n) for n in ("query", "key", "value", "proj")},
              norm2=_norm(sd, f"{prefix}.layernorm_after"),
              mlp=dict(fc1=linear("fc1"), fc2=linear("fc2")))


def _layer_prefix(sd, candidates):
  for candidate in candidates:
    if any(k.startswith(candidate + ".") for k in sd):
      return candidate
  raise ConversionError(f"{sd.where}: no layers under any of {list(candidates)}")


def _indices(sd, pattern):
  found = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  if found and found != set(range(max(found) + 1)):
    raise ConversionError(f"{sd.where}: layers {sorted(found)} are not numbered 0..{max(found)}")
  return len(found)


def _posemb(sd, key, width, patch_size, learned_allowed=True):
  """(posemb kind, image_size, table or None) from a [1, 1+N, D] (or [1+N, D]) table."""
  table = np.asarray(sd[key], np.float32).reshape(-1, width)
  grid = int(round((table.shape[0] - 1) ** 0.5))
  if grid * grid != table.shape[0] - 1:
    raise ConversionError(f"{sd.where}: {key} has {table.shape[0]} rows, not 1 + a square number of patches")
  fixed = vit.sincos_2d_posemb(width, grid) if width % 4 == 0 else None
  if fixed is not None and np.allclose(table, fixed, atol=POSEMB_ATOL):
    return "sincos2d", grid * patch_size, None
  if not learned_allowed:
    raise ConversionError(f"{sd.where}: {key} is not the fixed 2-D sin-cos table our MAE decoder uses")
  return "learn", grid * patch_size, table


def _heads(width, given, table, what):
  if given:
    return int(given)
  if width in table:
    return table[width]
  raise ConversionError(f"{what} width {width} is not a standard size: pass the number of heads "
                        "(--num_heads / --decoder_num_heads)")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *, layout: str | None = None,
                       hf_config: Mapping[str, Any] | None = None, num_heads: int | None = None,
                       decoder_num_heads: int | None = None, source: str = "checkpoint") -> Imported:
  """Converts a PyTorch state dict (numpy values) into our parameters; see the module docstring."""
  layout = layout or detect_layout(state_dict)
  if layout not in LAYOUTS:
    raise ConversionError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  sd = TrackedStateDict({k: np.asarray(v) for k, v in state_dict.items()}, source)
  if layout == "hf":
    return _convert_hf(sd, hf_config or {}, num_heads, decoder_num_heads)
  return _convert_mae_or_timm(sd, layout, num_heads, decoder_num_heads)


def _convert_mae_or_timm(sd, layout, num_heads, decoder_num_heads):
  patch_w = sd["patch_embed.proj.weight"]
  width, _, patch, _ = patch_w.shape
  encoder = dict(patch_embed=dict(kernel=np.ascontiguousarray(patch_w.transpose(2, 3, 1, 0)),
                                  bias=sd["patch_embed.proj.bias"]),
                 cls_token=sd["cls_token"].reshape(-1), norm=_norm(sd, "norm"))
  posemb, image_size, table = _posemb(sd, "pos_embed", width, patch)
  if table is not None:
    encoder["pos_embed"] = table
  depth = _indices(sd, r"blocks\.(\d+)\.")
  for i in range(depth):
    encoder[f"blocks_{i}"] = _timm_block(sd, f"blocks.{i}")
  params = {"encoder": encoder}
  model = dict(width=int(width), depth=depth, num_heads=_heads(width, num_heads, STANDARD_HEADS, "encoder"),
               mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]), patch_size=int(patch),
               image_size=image_size, posemb=posemb, layer_norm_eps=1e-6)
  if layout == "mae":
    decoder_width = int(sd["decoder_embed.weight"].shape[0])
    params.update(decoder_embed=_linear(sd, "decoder_embed"), mask_token=sd["mask_token"].reshape(-1),
                  decoder_norm=_norm(sd, "decoder_norm"), decoder_pred=_linear(sd, "decoder_pred"))
    if "decoder_pos_embed" in sd:
      _posemb(sd, "decoder_pos_embed", decoder_width, patch, learned_allowed=False)
    decoder_depth = _indices(sd, r"decoder_blocks\.(\d+)\.")
    for i in range(decoder_depth):
      params[f"decoder_blocks_{i}"] = _timm_block(sd, f"decoder_blocks.{i}")
    model.update(decoder_width=decoder_width, decoder_depth=decoder_depth,
                 decoder_heads=_heads(decoder_width, decoder_num_heads, STANDARD_DECODER_HEADS, "decoder"),
                 decoder_mlp_dim=int(sd["decoder_blocks.0.mlp.fc1.weight"].shape[0]))
  # A classifier head and its norm are task-specific: ours is trained in fine-tuning.
  dropped = [k for k in sd.unused() if k.startswith(("head.", "fc_norm."))]
  for k in dropped:
    sd.drop(k)
  return _finish(sd, params, model, layout, dropped)


def _convert_hf(sd, hf_config, num_heads, decoder_num_heads):
  prefix = next((k[:-len("embeddings.patch_embeddings.projection.weight")] for k in sd
                 if k.endswith("embeddings.patch_embeddings.projection.weight")))
  patch_w = sd[f"{prefix}embeddings.patch_embeddings.projection.weight"]
  width, _, patch, _ = patch_w.shape
  encoder = dict(patch_embed=dict(kernel=np.ascontiguousarray(patch_w.transpose(2, 3, 1, 0)),
                                  bias=sd[f"{prefix}embeddings.patch_embeddings.projection.bias"]),
                 cls_token=sd[f"{prefix}embeddings.cls_token"].reshape(-1), norm=_norm(sd, f"{prefix}layernorm"))
  posemb, image_size, table = _posemb(sd, f"{prefix}embeddings.position_embeddings", width, patch)
  if table is not None:
    encoder["pos_embed"] = table
  layer_prefix = _layer_prefix(sd, (f"{prefix}layers", f"{prefix}encoder.layer"))
  depth = _indices(sd, re.escape(layer_prefix) + r"\.(\d+)\.")
  for i in range(depth):
    encoder[f"blocks_{i}"] = _hf_block(sd, f"{layer_prefix}.{i}")
  params = {"encoder": encoder}
  fc1 = encoder["blocks_0"]["mlp"]["fc1"]["kernel"]
  model = dict(width=int(width), depth=depth,
               num_heads=int(num_heads or hf_config.get("num_attention_heads") or
                             _heads(width, None, STANDARD_HEADS, "encoder")),
               mlp_dim=int(fc1.shape[1]), patch_size=int(patch), image_size=image_size, posemb=posemb,
               layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)))
  if hf_config.get("image_size") and int(hf_config["image_size"]) != image_size:
    raise ConversionError(f"{sd.where}: config.json says image_size {hf_config['image_size']} but the "
                          f"position table is for {image_size}")
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"{sd.where}: hidden_act={hf_config['hidden_act']!r}; only exact 'gelu' is supported")
  if "decoder.decoder_embed.weight" in sd:
    decoder_width = int(sd["decoder.decoder_embed.weight"].shape[0])
    params.update(decoder_embed=_linear(sd, "decoder.decoder_embed"),
                  mask_token=sd["decoder.mask_token"].reshape(-1),
                  decoder_norm=_norm(sd, "decoder.decoder_norm"), decoder_pred=_linear(sd, "decoder.decoder_pred"))
    if "decoder.decoder_pos_embed" in sd:
      _posemb(sd, "decoder.decoder_pos_embed", decoder_width, patch, learned_allowed=False)
    # transformers 5 in memory, transformers 4 on disk, and transformers 5's save_pretrained.
    decoder_prefix = _layer_prefix(sd, ("decoder.decoder_layers", "decoder.decoder_encoder.layer"))
    decoder_depth = _indices(sd, re.escape(decoder_prefix) + r"\.(\d+)\.")
    for i in range(decoder_depth):
      params[f"decoder_blocks_{i}"] = _hf_block(sd, f"{decoder_prefix}.{i}")
    model.update(decoder_width=decoder_width, decoder_depth=decoder_depth,
                 decoder_heads=int(decoder_num_heads or hf_config.get("decoder_num_attention_heads") or
                                   _heads(decoder_width, None, STANDARD_DECODER_HEADS, "decoder")),
                 decoder_mlp_dim=int(params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"].shape[1]))
    if hf_config.get("norm_pix_loss") is not None:
      model["norm_pix_loss"] = bool(hf_config["norm_pix_loss"])
    if hf_config.get("mask_ratio") is not None:
      model["mask_ratio"] = float(hf_config["mask_ratio"])
  dropped = [k for k in sd.unused() if k.startswith(("pooler.", "classifier.", f"{prefix}pooler."))]
  for k in dropped:
    sd.drop(k)
  return _finish(sd, params, model, "hf", dropped)


def _finish(sd, params, model, layout, dropped):
  unknown = sd.unused()
  if unknown:
    logging.warning("%s: %d checkpoint keys were not converted: %s", sd.where, len(unknown), unknown[:20])
  imported = Imported(params=params, model=model, layout=layout, source=sd.where, dropped=dropped,
                      unknown=unknown)
  check_against_model(imported)
  return imported


# --- checking against our modules ---------------------------------------------------------------


def model_config(model: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A model ConfigDict (as configs/common.vit_config) for the imported settings."""
  cfg = ml_collections.ConfigDict(dict(model))
  cfg.variant = "B"  # every size is given explicitly; the preset is only a placeholder
  return cfg


def build_module(model: Mapping[str, Any]):
  """Our MaskedAutoencoder (when a decoder was imported) or VisionTransformer for these settings."""
  cfg = model_config(model)
  if "decoder_width" in model:
    module = mae_lib.mae_from_config(cfg)
    return module, dict(images=jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),
                        noise=jnp.zeros((1, (cfg.image_size // cfg.patch_size) ** 2)))
  return vit.vit_from_config(cfg), dict(images=jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))


def check_against_model(imported: Imported) -> None:
  """Raises ConversionError naming every missing, unexpected or mis-shaped parameter."""
  module, inputs = build_module(imported.model)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"]
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  expected = _flat(nn.unbox(abstract) if "decoder_width" in imported.model else {"encoder": nn.unbox(abstract)})
  got = _flat(imported.params)
  problems = [f"{k}: missing from the checkpoint" for k in sorted(set(expected) - set(got))]
  problems += [f"{k}: not a parameter of our model" for k in sorted(set(got) - set(expected))]
  problems += [f"{k}: checkpoint shape {got[k]}, our model {expected[k]}" for k in sorted(set(got) & set(expected))
               if tuple(got[k]) != tuple(expected[k])]
  if problems:
    raise ConversionError(f"{imported.source}: the converted parameters do not fit our model "
                          f"({imported.model}):\n  " + "\n  ".join(problems[:40]))


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = tuple(np.shape(value))
  return out


# --- writing ------------------------------------------------------------------------------------


def save_imported(imported: Imported, out_dir: str) -> str:
  """Writes OUT/checkpoints/0 (Orbax, state item {'params': ...}) and OUT/import.json."""
  from affect_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  checkpoint_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
    raise ConversionError(f"{checkpoint_dir} already holds checkpoints; choose an empty OUT folder")
  os.makedirs(out_dir, exist_ok=True)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), imported.params)
  checkpointer = checkpointing.Checkpointer(checkpoint_dir, async_save=False)
  try:
    checkpointer.save(0, {"params": params})
  finally:
    checkpointer.close()
  report = imported.report()
  report["config_overrides"] = [f"--config.model.{k}={v}" for k, v in imported.model.items()]
  with open(os.path.join(out_dir, "import.json"), "w") as f:
    json.dump(report, f, indent=1)
  return checkpoint_dir


def import_checkpoint(path: str, out_dir: str, **kwargs) -> Imported:
  """Reads, converts, checks and writes; returns the Imported record."""
  state_dict, hf_config = read_checkpoint(path)
  imported = convert_state_dict(state_dict, hf_config=hf_config, source=path, **kwargs)
  save_imported(imported, out_dir)
  return imported


_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Encoder heads (default: config.json or the standard size).")
_DECODER_NUM_HEADS = flags.DEFINE_integer("decoder_num_heads", None, "MAE decoder heads (default: 16 for 512 wide).")
_LAYOUT = flags.DEFINE_enum("layout", None, list(LAYOUTS), "Force the key layout (default: detected).")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m affect_jax.tools.import_torch CKPT OUT")
  try:
    imported = import_checkpoint(argv[1], argv[2], layout=_LAYOUT.value, num_heads=_NUM_HEADS.value,
                                 decoder_num_heads=_DECODER_NUM_HEADS.value)
  except ConversionError as e:
    raise SystemExit(f"import_torch: {e}") from e
  lines = [f"Converted {argv[1]} ({imported.layout} layout) into {os.path.abspath(argv[2])}",
           f"  parts: {'encoder + MAE decoder' if 'decoder_embed' in imported.params else 'encoder'}",
           f"  dropped (task heads / fixed tables): {len(imported.dropped)} keys",
           f"  NOT converted (unknown): {imported.unknown if imported.unknown else 'none'}",
           "  use as init_from with these model settings:",
           "    --config.init_from=" + os.path.abspath(argv[2]) + " " +
           " ".join(f"--config.model.{k}={v}" for k, v in imported.model.items())]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
