r"""The transfer study: lambda schedules x attributes x seeds, scored by CLIP and VGG metrics.

  python -m launch.study --config=configs/study.py:toy --workdir=workdir/study_toy
  python -m launch.study --config=configs/study.py --workdir=workdir/study
  python -m launch.study --config=configs/study.py:sd --config.model.path=PATH/sd-v1-5 \
      --config.loss_models.clip_path=PATH/clip-vit-base-patch32 \
      --config.loss_models.vgg_path=PATH/vgg16.safetensors \
      --config.weights_files=workdir/smile/weights.json --workdir=workdir/study_sd

Variants (the part after ":"): "toy" (the shipped toy world: its four attributes with c0 "a
photo of a shape", the toy CLIP and VGG, and the judge's scores in the rows), "tiny" (default;
built-in random models, seconds, for tests and smoke runs), "sd"
(Stable Diffusion v1.x settings of the paper; set the model paths), and "sd2", "sd21", "sdxl"
(SD 2.x base, SD 2.1 at 768 px, SDXL base at 1024 px; the family is read from model.path).
"""
import ml_collections

from configs import common
from configs import disentangle
from configs import toy


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg != "toy":
    common.check_variant(arg, "configs/study.py")
  c = ml_collections.ConfigDict()
  c.model = common.model_config()
  c.loss_models = common.loss_models_config()
  common.add_sampling(c)  # rng_seed, num_steps, guidance, sampler, eta
  c.weights_files = ""  # learned sources: weights.json files of launch.disentangle (comma list)
  # baseline sources: hard switch from c0 to c1 after T* steps (comma list); "" = 10,20,30 of
  # 50 steps, scaled to num_steps
  c.t_stars = ""
  c.lambda_late = 1.0  # lambda after the baseline switches
  c.include_c1 = True  # baseline source: pure c1 at every step
  c.attributes = "smile,angry,young"  # names in `presets` (comma list)
  # more attributes as prompt pairs: "c0|appended text" items separated by ";", e.g.
  # "a photo of a shape|, covered by snow;A photo of a dog|, smiling"
  c.prompt_pairs = ""
  c.presets = {n: dict(prompt=p, attribute=a)
               for n, (p, a, *_) in disentangle.PRESETS.items()}  # what `attributes` names
  c.seeds = tuple(range(8))  # every (source, attribute) is scored on each seed
  # a folder of real images: scored instead of seeds (inverted: DDIM, or Euler on flow models)
  c.images_dir = ""
  # real images: inversion residuals injected in the first K steps (33 of 50, scaled)
  c.inject_steps = common.steps_of_50(c, 33)
  c.pin = "next"  # real images: inversion target "next" (correct) | "current" (the release's)
  c.image_size = 0  # px; 0 = the model's native size
  c.preprocess = "standard"  # CLIP preprocessing of the metrics: "standard" | "release"
  c.batch_size = 4  # (attribute, seed) units per compiled call and per resumable chunk
  c.grid_seeds = 4  # sample images and grids are kept for the first this-many seeds
  if arg == "toy":
    toy.world_fields(c)
    c.attributes = ",".join(toy.OPEN_PRESETS)
    c.presets = {n: dict(prompt=p, attribute=a) for n, (p, a, *_) in toy.PRESETS.items()}
    c.t_stars = "5,10,20,30"
    c.batch_size = 8
  elif arg != "tiny":
    common.native_size(c, arg)
    c.batch_size = 1
  return c
