"""Fine-tuning head layout and its multi-task loss: each task's loss over its own valid frames."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import losses
from affect_jax.train import mae_finetune


def test_head_size():
  assert mae_finetune.head_size(("expr",)) == 8
  assert mae_finetune.head_size(("expr", "va", "au")) == 22
  assert mae_finetune.head_size(("expr", "au")) == 20
  with pytest.raises(ValueError, match="must include 'expr'"):
    mae_finetune.head_size(("va",))


def test_multitask_loss_is_the_sum_of_masked_task_losses():
  rng = np.random.default_rng(0)
  n = 16
  logits = jnp.asarray(rng.normal(size=(n, 22)), jnp.float32)
  batch = {
      "label": jnp.asarray(rng.integers(0, 8, n)), "expr_valid": jnp.asarray(rng.random(n) > 0.3),
      "va": jnp.asarray(rng.uniform(-1, 1, (n, 2)), jnp.float32), "va_valid": jnp.asarray(rng.random(n) > 0.3),
      "au": jnp.asarray(rng.integers(0, 2, (n, 12))), "au_valid": jnp.asarray(rng.random(n) > 0.3),
  }
  got = mae_finetune.finetune_loss(logits, batch, ("expr", "va", "au"), 0.0)
  want = (losses.cross_entropy_loss(logits[:, :8], batch["label"], batch["expr_valid"])
          + losses.ccc_loss(logits[:, 8:10], batch["va"], batch["va_valid"])
          + losses.bce_loss(logits[:, 10:], batch["au"].astype(jnp.float32), batch["au_valid"]))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  # Labels of invalid frames do not matter.
  garbage = dict(batch, label=jnp.where(batch["expr_valid"], batch["label"], 7),
                 va=jnp.where(batch["va_valid"][:, None], batch["va"], 9.0))
  np.testing.assert_allclose(float(mae_finetune.finetune_loss(logits, garbage, ("expr", "va", "au"), 0.0)),
                             float(got), rtol=1e-6)


def test_expr_only_loss_is_plain_cross_entropy():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
  labels = jnp.asarray([0, 3, 7, 1, 2])
  got = mae_finetune.finetune_loss(logits, {"label": labels}, ("expr",), 0.1)
  want = losses.cross_entropy_loss(logits, labels, jnp.ones(5, bool), label_smoothing=0.1)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_mixup_blends_each_image_with_its_reverse_partner():
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(6, 4, 4, 3)), jnp.float32),
           "label": jnp.arange(6), "va": jnp.asarray(rng.uniform(-1, 1, (6, 2)), jnp.float32)}
  images, partner, lam = mae_finetune.mixup(batch, 0.8, jax.random.key(3))
  lam = float(lam)
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(images, lam * batch["image"] + (1 - lam) * batch["image"][::-1], atol=1e-6)
  np.testing.assert_array_equal(partner["label"], [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(partner["va"], np.asarray(batch["va"])[::-1])
  # Beta(0.8, 0.8) draws over many keys: mean 1/2, variance 1/(4 (2 alpha + 1)) = 0.0962.
  draws = np.array([float(mae_finetune.mixup(batch, 0.8, jax.random.key(k))[2]) for k in range(400)])
  assert abs(draws.mean() - 0.5) < 0.05 and abs(draws.var() - 0.0962) < 0.02


def test_mixup_off_leaves_the_batch_alone():
  batch = {"image": jnp.ones((2, 4, 4, 3)), "label": jnp.arange(2)}
  images, partner, lam = mae_finetune.mixup(batch, 0.0, jax.random.key(0))
  assert images is batch["image"] and partner is batch and lam == 1.0
