"""The finding of METHOD.md section 1: condition the first T* steps on c0, the rest on c1.

  python -m launch.switch --config=configs/switch.py --workdir=workdir/switch
  python -m launch.switch --config=configs/switch.py:sd --config.model.path=/models/sd-v1-5 \
      --workdir=out/switch

Variants (the part after ":"): "tiny" (default; built-in random model, a few seconds) and "sd"
(Stable Diffusion v1.x settings of the paper; set model.path).
"""
import ml_collections

from configs import common
from disentangle_jax import errors


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in ("tiny", "sd"):
    raise errors.UserError(f"configs/switch.py has no variant {arg!r}: use 'tiny' or 'sd'.")
  c = ml_collections.ConfigDict()
  c.model = common.model_config()
  c.prompt = "A photo of person"  # c0, the neutral prompt
  c.attribute = ", smiling"  # c1 = prompt + attribute
  c.seeds = (42, 43)  # one grid row per seed
  common.add_sampling(c)  # rng_seed, num_steps, guidance, sampler, eta
  # grid columns: switch from c0 to c1 after T* steps (comma list); "" = 10,20,30 of 50 steps,
  # scaled to num_steps
  c.t_stars = ""
  c.lambda_late = 1.0  # lambda after the switch (1.0-1.2 in the paper)
  # extra columns (comma list): weights.json from launch.disentangle, or .json/.npy/.txt
  c.lambda_files = ""
  c.image_size = 0  # output size in px; 0 = the model's native size
  c.batch_size = 8  # images per compiled sampler call
  if arg == "sd":
    c.seeds = (42,)
    c.image_size = 512
    c.batch_size = 1
  return c
