r"""Runs one stage of affect_jax: parses flags and the config, then calls the stage.

  python -m affect_jax.main --config=configs/va.py --workdir=W [--config.key=value ...]

Several hosts: pass --coordinator_address/--num_processes/--process_id, or run under a TPU pod or
SLURM, whose environment `jax.distributed.initialize()` reads by itself.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from affect_jax import allocator
from affect_jax import compilation_cache
from affect_jax import stages
from affect_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several hosts).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (several hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (several hosts).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with the cluster's environment (TPU pod, SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  allocator.limit_arenas()  # before the data pipelines' threads (affect_jax/allocator.py)
  compilation_cache.enable()  # before the first compilation (affect_jax/compilation_cache.py)
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value)
  config = _CONFIG.value
  if not config.data.affwild2_dir:
    logging.warning(datasets.SYNTHETIC_NOTICE)
  stages.validate(config)
  workdir = stages.prepare_workdir(_WORKDIR.value)
  logging.info("affect_jax stage %r, workdir %s, process %d of %d, devices %s", config.stage, workdir,
               jax.process_index(), jax.process_count(), jax.devices())
  logging.info("Resolved config:\n%s", config)
  stages.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
