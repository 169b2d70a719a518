"""AU temporal model: `python -m affect_jax.main --config=configs/au.py[:fold=K,size=S,affwild2=DIR] --workdir=W`."""

from configs import temporal


def get_config(arg=None):
  return temporal.get_temporal_config("au", arg)
