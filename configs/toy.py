r"""Learn lambda for one edit in the toy world (the shipped, trained toy weights): the README's
main command.

  python -m launch.disentangle --config=configs/toy.py:snow --workdir=workdir/toy_snow

Presets: snow, smiling, wooden, night (c0 = a content caption of the toy world, c1 = c0 + the
attribute). The model (model.path), the toy CLIP (loss_models.clip_path) and the prompts come
from the toy world; everything else is configs/disentangle.py's (override any field as usual).
Rebuild the weights with `python -m launch.train_toy --config=configs/train_toy.py`.
"""
import os

import ml_collections

from configs import common
from configs import disentangle

# The shipped toy world (disentangle_jax/toy/weights: sd/, clip/, judge/, made.json).
TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "disentangle_jax", "toy", "weights")

# name: (c0, attribute appended to make c1, seed, T*, lambda_late). T* from the hard-switch
# table of benchmarks/toy_world.py (the global style "night" needs an earlier switch).
PRESETS = {
    "snow": ("a photo of a red circle on the left", ", covered by snow", 42, 20, 1.0),
    "smiling": ("a photo of a yellow circle on the left", ", smiling", 42, 20, 1.0),
    "wooden": ("a photo of a red square on the right", ", wooden", 42, 20, 1.0),
    "night": ("a photo of a blue circle on the right", ", at night", 42, 10, 1.0),
}


def get_config(arg: str = "snow") -> ml_collections.ConfigDict:
  name, _ = common.parse_preset_arg(arg, PRESETS, "configs/toy.py")
  prompt, attribute, seed, t_star, late = PRESETS[name]
  c = disentangle.get_config("smile")
  c.preset = name
  c.model.path = os.path.join(TOY_WEIGHTS, "sd")  # the toy SD (diffusers layout)
  c.loss_models.clip_path = os.path.join(TOY_WEIGHTS, "clip")  # the toy CLIP (HF layout)
  c.prompt = prompt  # c0, the neutral prompt
  c.attribute = attribute  # c1 = prompt + attribute
  c.seeds = (seed,)
  c.t_star = common.steps_of_50(c, t_star)  # hard-switch initialisation (T* of 50, scaled)
  c.lambda_late = late
  c.presets = {n: dict(prompt=p, attribute=a, t_star=t, lambda_late=l)
               for n, (p, a, _, t, l) in PRESETS.items()}  # read by `attributes`
  c.loss.preprocess = "standard"  # the toy CLIP was trained on CLIP's mean/std normalisation
  return c
