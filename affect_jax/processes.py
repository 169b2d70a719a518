"""Waiting for the other processes of a multi-process run (jax.distributed).

A barrier goes through the distributed runtime's coordination service, with an explicit timeout,
not through a device collective: one process may work for a long time (generating the synthetic
data, building the TFDS datasets from a real Aff-Wild2 copy, writing the feature store) while the
others wait, and a collective-based barrier (`multihost_utils.sync_global_devices`) gives up after
the CPU collectives' connect timeout (Gloo: "Connect timeout").
"""

import itertools

import jax
import orbax.checkpoint as ocp

LONG_WAIT_S = 24 * 3600  # building the datasets of a full Aff-Wild2 copy takes hours

_counter = itertools.count()


def wait_for_all(name: str, timeout_s: int = LONG_WAIT_S) -> None:
  """Returns once every process has called `wait_for_all` with `name` (in the same order)."""
  if jax.process_count() == 1:
    return
  # Coordination-service barrier ids must be unique within a run: number each call. Every process
  # makes the same calls in the same order, so the numbers agree.
  key = f"affect_jax:{name}:{next(_counter)}"
  ocp.multihost.sync_global_processes(key, timeout=timeout_s, processes=set(range(jax.process_count())))
