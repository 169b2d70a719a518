"""Feature extraction: the fine-tuned encoder over every frame of every video into the feature store.

Frames without a face image get the features of the nearest frame that has one (earlier frame on a
tie); a video with no face at all gets zeros. The same rule serves training, validation, test and
`affect_jax.predict`.
"""

from configs import common
from configs import mae_finetune


def get_config(arg=None):
  args = common.parse_arg(arg, **common.default_args())
  config = common.base_config(args, "extract")
  config.model = common.vit_config(config.size)
  config.model.dtype = config.get_ref("dtype")
  config.model.pool = "cls"
  config.model.head_dropout = 0.0
  config.batch_size = {"smoke": 16, "tiny": 128, "paper": 512}[config.size]
  config.missing_face = "nearest"
  config.init_from = ""  # empty: the upstream stage's workdir
  config.upstream = mae_finetune.get_config(arg)
  common.share_data(config)
  return config
