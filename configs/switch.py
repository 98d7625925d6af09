"""The finding of docs/METHOD.md section 1: condition the first T* steps on c0, the rest on c1.

  python -m launch.switch --config=configs/switch.py:toy --workdir=workdir/switch_toy
  python -m launch.switch --config=configs/switch.py --workdir=workdir/switch
  python -m launch.switch --config=configs/switch.py:sd --config.model.path=/models/sd-v1-5 \
      --workdir=out/switch

Variants (the part after ":"): "toy" (the shipped toy world, configs/toy.py's snow preset:
c0 leaves shape, colour and position to the seed), "tiny" (default; built-in random model, for
tests and smoke runs), "sd"
(Stable Diffusion v1.x settings of the paper; set model.path), and "sd2", "sd21", "sdxl"
(SD 2.x base, SD 2.1 at 768 px, SDXL base at 1024 px; the family is read from model.path).
"""
import ml_collections

from configs import common
from configs import toy


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg != "toy":
    common.check_variant(arg, "configs/switch.py")
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
  if arg == "toy":
    toy.world_fields(c)
    c.prompt, c.attribute = toy.PRESETS["snow"][:2]
    c.seeds = tuple(range(6))
    c.t_stars = "5,10,20,30"
  elif arg != "tiny":
    c.seeds = (42,)
    common.native_size(c, arg)
    c.batch_size = 1
  return c
