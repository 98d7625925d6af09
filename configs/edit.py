r"""Edit a real image (docs/METHOD.md section 5): invert it, then apply or learn the mixing weights.

  python -m launch.edit --config=configs/edit.py:toy --workdir=workdir/edit_toy
  python -m launch.edit --config=configs/edit.py --workdir=workdir/edit
  python -m launch.edit --config=configs/edit.py:snow,sd --config.image=church.jpg \
      --config.model.path=PATH/sd-v1-5 --config.loss_models.clip_path=PATH/clip-vit-base-patch32 \
      --config.loss_models.vgg_path=PATH/vgg16.safetensors --workdir=workdir/church_snow
  python -m launch.edit --config=configs/edit.py:snow,sd --config.image=church.jpg \
      --config.weights=workdir/snow/weights.json --config.model.path=PATH/sd-v1-5 \
      --workdir=workdir/church_snow_transfer

The argument after ":" is "toy" (the shipped toy world editing one of its input images,
disentangle_jax/toy/inputs/*.png: "a photo of a red circle on the left" -> ", covered by snow";
choose another with image, prompt and attribute) or a preset (PRESETS: the release's
real-image example), optionally
followed by ",sd" for Stable Diffusion v1.x settings (512 px), ",sd2" (SD 2.x base, 512 px),
",sd21" (SD 2.1, 768 px, v-prediction) or ",sdxl" (SDXL base, 1024 px); without it the built-in
tiny model is used. ``image`` empty = a synthetic picture drawn in code (real_images.synthetic), for
the demo and the tests. ``weights`` set = apply that exported lambda (its prompts are used);
empty = learn lambda on this image (same losses and checkpoints as launch.disentangle).
The sampler is DDIM with eta = 0 (the inversion's residuals replace the random noise); on an
SD 3.x or Flux.1 model it is the flow-matching Euler sampler, inverted by Euler inversion.
"""
import os

import ml_collections

from configs import common
from configs import disentangle
from configs import toy

# name: (c0, attribute appended to make c1, seed, T*, lambda_late) -- docs/METHOD.md section 7:
# every preset of configs/disentangle.py; "snow" is the release's real-image example.
PRESETS = dict(disentangle.PRESETS,
               snow=("A photo of church exterior", ", covered by snow", 42, 10, 1.1),
               toy=("a photo of a red circle on the left", ", covered by snow", 42, 10, 1.0))
TOY_INPUTS = os.path.join(os.path.dirname(toy.TOY_WEIGHTS), "inputs")  # rendered toy scenes


def get_config(arg: str = "snow") -> ml_collections.ConfigDict:
  name, size = common.parse_preset_arg(arg, PRESETS, "configs/edit.py",
                                       sizes=() if arg.startswith("toy") else tuple(common.SIZES))
  prompt, attribute, seed, t_star, late = PRESETS[name]
  c = ml_collections.ConfigDict()
  c.preset = name
  c.model = common.model_config()
  c.loss_models = common.loss_models_config()
  c.image = ""  # path of the image to edit (any PIL format); "" = a synthetic picture
  c.weights = ""  # weights.json to apply (launch.disentangle); "" = learn lambda on this image
  c.prompt = prompt  # c0, the neutral prompt (also conditions the inversion)
  c.attribute = attribute  # c1 = prompt + attribute
  c.seed = seed  # keys the forward-noised targets of the inversion
  common.add_sampling(c, sampler=False)  # rng_seed, num_steps, guidance (DDIM, eta = 0)
  # residuals injected in the first K steps (33 of 50, scaled to num_steps); num_steps = exact
  # reconstruction
  c.inject_steps = common.steps_of_50(c, 33)
  c.pin = "next"  # reconstruction target: "next" (correct DDIM level) | "current" (the release's)
  c.encode_sample = False  # encode a VAE posterior sample (keyed by seed) instead of its mean
  c.image_size = 0  # px of the square model input; 0 = the model's native size
  common.add_learning(c, t_star, late)  # t_star, lambda_late, remat, faithful, loss, optimizer
  if size:
    common.native_size(c, size)
  if name == "toy":
    toy.world_fields(c)
    c.image = os.path.join(TOY_INPUTS, "red_circle_left.png")
  return c
