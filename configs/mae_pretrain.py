"""MAE pre-training of the ViT encoder on the face-image mixture (paper §3.1, §4.1.1).

  python -m affect_jax.main --config=configs/mae_pretrain.py[:size=paper,faces=/data/faces] --workdir=W
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, **common.default_args())
  config = common.base_config(args, "mae_pretrain")
  size = config.size
  config.model = common.vit_config(size)
  config.model.dtype = config.get_ref("dtype")
  batch = {"smoke": 8, "tiny": 64, "paper": common.MAE_BATCH}[size]
  epochs = {"smoke": 1, "tiny": 30, "paper": common.MAE_EPOCHS}[size]
  config.optimizer = common.optimizer_config(
      lr=common.MAE_LR, weight_decay=0.05, warmup_epochs={"smoke": 0, "tiny": 0.3, "paper": 40}[size],
      epochs=epochs, batch_size=batch)
  config.optimizer.b2 = 0.95  # MAE's AdamW betas
  config.num_train_steps = {"smoke": 3, "tiny": 600, "paper": -1}[size]  # -1: from epochs
  # Weights of the face datasets in the pre-training mixture (missing datasets are dropped).
  config.mixture = dict(affectnet=1.0, rafdb=1.0, fer2013=1.0, ferplus=1.0, affwild2=1.0)
  config.init_from = ""
  config.num_pictures = 8  # reconstructions written to TensorBoard at each evaluation
  config.eval_every_steps = {"smoke": 3, "tiny": 200, "paper": 5000}[size]
  return config
