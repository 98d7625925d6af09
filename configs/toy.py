r"""Learn lambda for one edit in the toy world (the shipped, trained toy weights): the README's
main command.

  python -m launch.disentangle --config=configs/toy.py:snow --workdir=workdir/toy_snow

Presets: snow, smiling, wooden, night leave shape, colour and position to the seed (c0 = "a
photo of a shape", c1 = c0 + the attribute; the toy world's attributes correlate with content,
so pure c1 changes what the seed decided, as "smiling" changes a person in Stable Diffusion);
snow_named, smiling_named, wooden_named, night_named name every content word in c0 (the text
pins the content). The model (model.path), the toy CLIP (loss_models.clip_path), the world's
VGG16-shaped perceptual network (loss_models.vgg_path; unset it for the random tiny VGG) and
the prompts come from the toy world; everything else is configs/disentangle.py's (override
any field as usual). configs/switch.py:toy, configs/edit.py:toy and configs/study.py:toy use
the same world (``world_fields``). Rebuild the weights with
`python -m launch.train_toy --config=configs/train_toy.py`.
"""
import os

import ml_collections

from configs import common
from configs import disentangle

# The shipped toy world (disentangle_jax/toy/weights: sd/, clip/, judge/, vgg/, made.json).
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "disentangle_jax", "toy", "weights")
TOY_IMAGE_SIZE = 32  # px (disentangle_jax/toy/scenes.py IMAGE_SIZE)
OPEN = "a photo of a shape"  # c0 that leaves shape, colour and position to the seed

# name: (c0, attribute appended to make c1, seed, T*, lambda_late). T* from the hard-switch
# table of benchmarks/toy_world.py.
PRESETS = {
    "snow": (OPEN, ", covered by snow", 42, 20, 1.0),
    "smiling": (OPEN, ", smiling", 42, 20, 1.0),
    "wooden": (OPEN, ", wooden", 42, 20, 1.0),
    "night": (OPEN, ", at night", 42, 10, 1.0),
    "snow_named": ("a photo of a red circle on the left", ", covered by snow", 42, 20, 1.0),
    "smiling_named": ("a photo of a yellow circle on the left", ", smiling", 42, 20, 1.0),
    "wooden_named": ("a photo of a red square on the right", ", wooden", 42, 20, 1.0),
    "night_named": ("a photo of a blue circle on the right", ", at night", 42, 10, 1.0),
}
OPEN_PRESETS = ("snow", "smiling", "wooden", "night")  # the study's attributes


def world_fields(c: ml_collections.ConfigDict) -> None:
  """Points a program's config at the shipped toy world: the model and, where the program has
  them, the loss networks (toy CLIP, the world's VGG at its image size) and the objective's
  CLIP preprocessing (the toy CLIP was trained with CLIP's mean/std normalisation)."""
  c.model.path = os.path.join(TOY_WEIGHTS, "sd")  # the toy SD (diffusers layout)
  if "loss_models" in c:
    c.loss_models.clip_path = os.path.join(TOY_WEIGHTS, "clip")  # the toy CLIP (HF layout)
    c.loss_models.vgg_path = os.path.join(TOY_WEIGHTS, "vgg", "vgg.safetensors")
    c.loss_models.vgg_input_size = TOY_IMAGE_SIZE
  if "loss" in c:
    c.loss.preprocess = "standard"


def presets_field() -> dict:
  """The presets as the `presets` config field (read by `attributes` and the study)."""
  return {n: dict(prompt=p, attribute=a, t_star=t, lambda_late=l)
          for n, (p, a, _, t, l) in PRESETS.items()}


def get_config(arg: str = "snow") -> ml_collections.ConfigDict:
  name, _ = common.parse_preset_arg(arg, PRESETS, "configs/toy.py", sizes=())
  prompt, attribute, seed, t_star, late = PRESETS[name]
  c = disentangle.get_config("smile")
  c.preset = name
  world_fields(c)
  c.prompt = prompt  # c0, the neutral prompt
  c.attribute = attribute  # c1 = prompt + attribute
  c.seeds = (seed,)
  c.t_star = common.steps_of_50(c, t_star)  # hard-switch initialisation (T* of 50, scaled)
  c.lambda_late = late
  c.presets = presets_field()  # read by `attributes`
  return c
