"""What each task (VA, EXPR, AU) supplies to the shared trainer: head size, loss, metrics."""

import dataclasses
from typing import Callable

import jax.numpy as jnp

from affect_jax import losses
from affect_jax import metrics
from affect_jax.data import schema


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  num_outputs: int
  main_metric: str                     # the challenge score, used to keep the best checkpoint
  loss: Callable                       # loss(outputs [B,T,K], batch, valid [B,T]) -> scalar
  stats: Callable                      # stats(outputs, labels, valid) -> metrics.Stats
  label_key: str

  def valid(self, batch):
    """Frames that count: a real (unpadded) frame with a valid label for this task."""
    return batch["frame_mask"] & batch[f"{self.label_key}_valid"]


def _va_loss(outputs, batch, valid):
  return losses.ccc_loss(outputs, batch["va"], valid)


def _expr_loss(outputs, batch, valid):
  return losses.cross_entropy_loss(outputs, batch["expr"], valid)


def _au_loss(outputs, batch, valid):
  return losses.bce_loss(outputs, batch["au"].astype(jnp.float32), valid)


TASKS = {
    "va": Task("va", schema.NUM_OUTPUTS["va"], "p_va", _va_loss,
               metrics.va_stats, "va"),
    "expr": Task("expr", schema.NUM_OUTPUTS["expr"], "expr_f1", _expr_loss,
                 metrics.expr_stats, "expr"),
    "au": Task("au", schema.NUM_OUTPUTS["au"], "au_f1", _au_loss,
               metrics.au_stats, "au"),
}
