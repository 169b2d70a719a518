"""Configs: every stage parses, variants resolve, typos are errors, sizes are consistent."""

import subprocess
import sys

import pytest

from affect_jax import stages
from configs import au, common, expr, extract, mae_finetune, mae_pretrain, va

ALL = {"mae_pretrain": mae_pretrain, "mae_finetune": mae_finetune, "extract": extract,
       "va": va, "expr": expr, "au": au}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("arg", ["", "size=smoke", "size=paper,fold=3", "affwild2=/data/aw2"])
def test_every_stage_config_builds_and_validates(name, arg):
  config = ALL[name].get_config(arg)
  stages.validate(config)
  assert config.stage == name
  expected_size = "paper" if "paper" in arg or "affwild2" in arg else ("smoke" if "smoke" in arg else "tiny")
  assert config.size == expected_size


def test_paper_numbers_reach_the_paper_configs():
  config = va.get_config("size=paper")
  assert (config.window, config.stride) == (300, 200)
  assert config.optimizer.lr == 3e-5 and config.optimizer.weight_decay == 1e-5
  assert config.optimizer.batch_size == 32 and config.model.dropout == 0.3
  assert config.model.num_layers == 8 and config.model.num_heads == 4 and config.model.ff_dim == 512
  assert config.model.posemb == "none" and tuple(config.model.tcn_dilations) == (1, 2, 4)
  mae = config.upstream.upstream.upstream
  assert mae.stage == "mae_pretrain" and mae.optimizer.batch_size == 1024 and mae.optimizer.lr == 5e-4
  assert mae.model.mask_ratio == 0.75 and mae.model.patch_size == 16 and mae.model.variant == "B"
  finetune = config.upstream.upstream
  assert finetune.optimizer.batch_size == 256 and finetune.optimizer.lr == 1e-4
  assert expr.get_config("size=paper").optimizer.epochs == 10
  assert au.get_config("size=paper").optimizer.epochs == 30


def test_unknown_argument_is_an_error():
  with pytest.raises(ValueError, match="Unknown config argument 'flod'"):
    va.get_config("flod=2")
  with pytest.raises(ValueError, match="size='huge'"):
    va.get_config("size=huge")


def test_dtype_reaches_the_model_through_one_reference():
  config = va.get_config("size=smoke")
  config.dtype = "bfloat16"
  assert config.model.dtype == "bfloat16"


@pytest.mark.parametrize("module", [va, expr, au, extract, mae_finetune])
def test_a_data_override_reaches_every_upstream_stage(module):
  """One dataset per workdir: the chain shares one `data` node, so an override changes every stage."""
  config = module.get_config("size=smoke")
  config.data.synthetic.videos = 7
  config.data.synthetic.va_delay_seconds = (1.0, 2.0)
  node, depth = config, 0
  while "upstream" in node:
    node, depth = node.upstream, depth + 1
    assert node.data.synthetic.videos == 7 and tuple(node.data.synthetic.va_delay_seconds) == (1.0, 2.0)
  assert node.stage == "mae_pretrain" and depth >= 1


def test_main_rejects_a_misspelt_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "affect_jax.main", "--config=configs/va.py:size=smoke",
       "--config.optimizer.lrr=1", f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "lrr" in result.stderr


def test_parse_arg_types():
  args = common.parse_arg("fold=2,seed=7,affwild2=/x,size=paper", **common.default_args())
  assert (args.fold, args.seed, args.affwild2, args.size) == (2, 7, "/x", "paper")
