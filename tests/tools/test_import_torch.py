"""Weight import from PyTorch: parity with Hugging Face's ViTMAEForPreTraining and ViTModel,
the official MAE layout, and the errors a wrong checkpoint gets."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from affect_jax.models import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
from affect_jax.tools import import_torch
from affect_jax.train import checkpointing

ATOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
             decoder_intermediate_size=64)


def _hf_mae(config_kwargs, seed):
  """A random ViTMAEForPreTraining with HF's own sin-cos position tables.

  transformers 5.x leaves both fixed tables at zero in a freshly constructed model (its
  `_init_weights` zeroes the decoder table and skips the encoder one); HF's own `initialize_weights`
  puts the tables a pre-trained checkpoint has back in place.
  """
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**config_kwargs)).eval()
  embeddings = model.vit.embeddings
  embeddings.patch_embeddings.projection._is_hf_initialized = False  # pylint: disable=protected-access
  with torch.no_grad():
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
  assert float(embeddings.position_embeddings.abs().sum()) > 0
  return model


def _inputs(config_kwargs, batch, seed=0):
  size = config_kwargs.get("image_size", 224)
  patches = (size // config_kwargs.get("patch_size", 16)) ** 2
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  noise = rng.random((batch, patches)).astype(np.float32)
  return images, noise


def _assert_mae_parity(hf_model, imported, params, images, noise):
  with torch.no_grad():
    hf = hf_model(torch.from_numpy(images), noise=torch.from_numpy(noise))
    hf_encoder = hf_model.vit(torch.from_numpy(images), noise=torch.from_numpy(noise), output_hidden_states=True)
  module, _ = import_torch.build_module(imported.model)
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  ours = jax.jit(lambda p, x, n: module.apply({"params": p}, x, noise=n))(params, nhwc, jnp.asarray(noise))
  np.testing.assert_allclose(float(ours["loss"]), float(hf.loss), atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(ours["mask"]), hf.mask.numpy())
  np.testing.assert_allclose(np.asarray(ours["pred"]), hf.logits.numpy(), atol=ATOL, rtol=0)

  def encoder_states(p, x, n):
    (latent, _, _), state = module.apply({"params": p}, x, n, False, method=module.encode_visible,
                                         capture_intermediates=True, mutable=["intermediates"])
    blocks = state["intermediates"]["encoder"]
    return latent, [blocks[f"blocks_{i}"]["__call__"][0] for i in range(imported.model["depth"])]

  latent, per_block = jax.jit(encoder_states)(params, nhwc, jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(latent), hf_encoder.last_hidden_state.numpy(), atol=ATOL, rtol=0)
  # HF hidden_states[0] is the embedding output; [i + 1] the output of layer i (before the final norm).
  assert len(hf_encoder.hidden_states) == imported.model["depth"] + 1
  for i, state in enumerate(per_block):
    np.testing.assert_allclose(np.asarray(state), hf_encoder.hidden_states[i + 1].numpy(), atol=ATOL, rtol=0,
                               err_msg=f"encoder layer {i}")
  return float(ours["loss"])


@pytest.fixture(scope="module")
def vit_b_mae(tmp_path_factory):
  """HF ViTMAEForPreTraining at the ViT-B configuration, saved and converted by the CLI."""
  root = tmp_path_factory.mktemp("vit_b_mae")
  hf_model = _hf_mae({}, seed=0)  # ViTMAEConfig() defaults: ViT-B/16 at 224, decoder 512 x 8, eps 1e-12
  hf_model.save_pretrained(root / "hf")
  out = root / "imported"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "affect_jax.tools.import_torch", str(root / "hf"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "encoder + MAE decoder" in result.stdout
  return hf_model, out


@pytest.mark.slow
def test_hf_vit_mae_base_parity(vit_b_mae):
  hf_model, out = vit_b_mae
  report = json.loads((out / "import.json").read_text())
  assert report["layout"] == "hf" and report["unknown_keys"] == []
  assert report["model"]["width"] == 768 and report["model"]["depth"] == 12
  assert report["model"]["num_heads"] == 12 and report["model"]["decoder_depth"] == 8
  assert report["model"]["layer_norm_eps"] == 1e-12 and report["model"]["posemb"] == "sincos2d"
  imported = import_torch.Imported(params=None, model=report["model"], layout="hf", source="", dropped=[],
                                   unknown=[])
  params = checkpointing.restore_params(str(out / "checkpoints"))["params"]
  images, noise = _inputs({}, batch=2)
  loss = _assert_mae_parity(hf_model, imported, params, images, noise)
  assert 0.1 < loss < 10.0  # a real reconstruction error, not a degenerate zero


@pytest.mark.slow
def test_imported_mae_starts_finetuning(vit_b_mae):
  """The imported folder is what mae_finetune's init_from reads: the encoder lands in a classifier."""
  _, out = vit_b_mae
  report = json.loads((out / "import.json").read_text())
  from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top
  assert trainer.has_checkpoint(str(out))
  mae_params = checkpointing.restore_params(trainer.checkpoint_dir(str(out)))["params"]
  model = classifier_lib.classifier_from_config(import_torch.model_config(dict(report["model"], posemb="learn")), 8)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  loaded = classifier_lib.load_mae_encoder(target, mae_params, model.encoder)
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  loaded = nn.unbox(loaded)
  np.testing.assert_array_equal(np.asarray(loaded["encoder"]["blocks_11"]["attn"]["query"]["kernel"]),
                                np.asarray(mae_params["encoder"]["blocks_11"]["attn"]["query"]["kernel"]))


def official_mae_state_dict(hf_model):
  """The HF model's weights under the official MAE (facebookresearch/mae) key names."""
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  out = {"cls_token": sd["vit.embeddings.cls_token"], "pos_embed": sd["vit.embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
         "mask_token": sd["decoder.mask_token"], "decoder_pos_embed": sd["decoder.decoder_pos_embed"]}
  for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
    out[f"{name}.weight"], out[f"{name}.bias"] = sd[f"decoder.{name}.weight"], sd[f"decoder.{name}.bias"]

  def block(src, dst):
    for part in ("weight", "bias"):
      out[f"{dst}.attn.qkv.{part}"] = np.concatenate(
          [sd[f"{src}.attention.{p}_proj.{part}"] for p in ("q", "k", "v")], axis=0)
      out[f"{dst}.attn.proj.{part}"] = sd[f"{src}.attention.o_proj.{part}"]
      out[f"{dst}.norm1.{part}"] = sd[f"{src}.layernorm_before.{part}"]
      out[f"{dst}.norm2.{part}"] = sd[f"{src}.layernorm_after.{part}"]
      out[f"{dst}.mlp.fc1.{part}"] = sd[f"{src}.mlp.fc1.{part}"]
      out[f"{dst}.mlp.fc2.{part}"] = sd[f"{src}.mlp.fc2.{part}"]

  for i in range(hf_model.config.num_hidden_layers):
    block(f"vit.layers.{i}", f"blocks.{i}")
  for i in range(hf_model.config.decoder_num_hidden_layers):
    block(f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}")
  return out


@pytest.fixture(scope="module")
def small_mae():
  return _hf_mae(SMALL, seed=1)


def test_official_mae_layout_converts_and_matches_hf(small_mae, tmp_path):
  sd = official_mae_state_dict(small_mae)
  sd["head.weight"] = np.zeros((10, 64), np.float32)  # a classifier head is dropped, not converted
  sd["blocks.0.ls1.gamma"] = np.ones((64,), np.float32)  # unknown: listed
  path = tmp_path / "mae_checkpoint.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 799}, path)
  imported = import_torch.import_checkpoint(str(path), str(tmp_path / "out"),
                                            num_heads=4, decoder_num_heads=4)
  assert imported.layout == "mae"
  assert imported.unknown == ["blocks.0.ls1.gamma"] and imported.dropped == ["head.weight"]
  assert imported.model["layer_norm_eps"] == 1e-6  # the official MAE's; HF uses 1e-12
  imported.model["layer_norm_eps"] = 1e-12  # compare with HF's model under its own epsilon
  # The same tensors through the HF route give identical parameters.
  hf_sd = {k: v.numpy() for k, v in small_mae.state_dict().items()}
  via_hf = import_torch.convert_state_dict(hf_sd, hf_config=small_mae.config.to_dict())
  jax.tree_util.tree_map(np.testing.assert_array_equal, imported.params, via_hf.params)
  params = checkpointing.restore_params(str(tmp_path / "out" / "checkpoints"))["params"]
  images, noise = _inputs(SMALL, batch=2, seed=3)
  _assert_mae_parity(small_mae, imported, params, images, noise)


def test_encoder_only_official_layout_has_no_decoder(small_mae):
  sd = {k: v for k, v in official_mae_state_dict(small_mae).items()
        if not k.startswith(("decoder", "mask_token"))}
  imported = import_torch.convert_state_dict(sd, num_heads=4)
  assert imported.layout == "timm" and set(imported.params) == {"encoder"}
  assert imported.model["posemb"] == "sincos2d" and "pos_embed" not in imported.params["encoder"]


def test_shape_mismatch_and_missing_key_are_errors(small_mae):
  sd = official_mae_state_dict(small_mae)
  bad = dict(sd, **{"decoder_pred.weight": sd["decoder_pred.weight"][:-3]})
  with pytest.raises(import_torch.ConversionError, match=r"decoder_pred/kernel: checkpoint shape \(32, 189\)"):
    import_torch.convert_state_dict(bad, num_heads=4, decoder_num_heads=4)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(import_torch.ConversionError, match="blocks.1.mlp.fc2.bias"):
    import_torch.convert_state_dict(missing, num_heads=4, decoder_num_heads=4)
  with pytest.raises(import_torch.ConversionError, match="Unknown checkpoint layout"):
    import_torch.convert_state_dict({"fc.weight": np.zeros((2, 2))})


def test_non_checkpoint_file_is_a_clear_error(tmp_path):
  path = tmp_path / "notes.pth"
  path.write_text("not a checkpoint")
  with pytest.raises(import_torch.ConversionError, match="notes.pth: not a readable PyTorch checkpoint"):
    import_torch.read_checkpoint(str(path))


def test_hf_vit_encoder_with_learned_position_embedding():
  config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, image_size=32, patch_size=8)
  torch.manual_seed(2)
  hf_model = transformers.ViTModel(config).eval()
  with torch.no_grad():
    hf_model.embeddings.position_embeddings.normal_(0, 0.5)  # a learned table, clearly not sin-cos
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  imported = import_torch.convert_state_dict(sd, hf_config=config.to_dict())
  assert imported.model["posemb"] == "learn" and imported.params["encoder"]["pos_embed"].shape == (17, 64)
  assert imported.dropped == ["pooler.dense.bias", "pooler.dense.weight"] and imported.unknown == []
  images, _ = _inputs(dict(image_size=32, patch_size=8), batch=2)
  with torch.no_grad():
    hf = hf_model(torch.from_numpy(images)).last_hidden_state.numpy()
  module, _ = import_torch.build_module(imported.model)
  ours = module.apply({"params": imported.params["encoder"]}, jnp.asarray(images.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours["cls"]), hf[:, 0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ours["patches"]), hf[:, 1:], atol=ATOL, rtol=0)


def test_timm_vit_parity():
  timm = pytest.importorskip("timm")
  torch.manual_seed(4)
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0).eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  imported = import_torch.convert_state_dict(sd, num_heads=4)
  assert imported.layout == "timm" and imported.model["posemb"] == "learn"
  images, _ = _inputs(dict(image_size=32, patch_size=8), batch=2)
  with torch.no_grad():
    tokens = model.forward_features(torch.from_numpy(images)).numpy()
  module, _ = import_torch.build_module(imported.model)
  ours = module.apply({"params": imported.params["encoder"]}, jnp.asarray(images.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours["cls"]), tokens[:, 0], atol=ATOL, rtol=0)
