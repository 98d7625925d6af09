r"""Learn the per-step mixing weights of one attribute edit (docs/METHOD.md sections 2, 4 and 7).

  python -m launch.disentangle --config=configs/disentangle.py:smile --workdir=workdir/smile
  python -m launch.disentangle --config=configs/disentangle.py:snow,sd \
      --config.model.path=PATH/sd-v1-5 --config.loss_models.clip_path=PATH/clip-vit-base-patch32 \
      --config.loss_models.vgg_path=PATH/vgg16.safetensors --workdir=workdir/snow

The argument after ":" is a preset name from PRESETS (the 14 settings of the reference
release), optionally followed by ",sd" for Stable Diffusion v1.x settings (512 px, batch 1),
",sd2" (SD 2.x base, 512 px), ",sd21" (SD 2.1, 768 px, v-prediction) or ",sdxl" (SDXL base,
1024 px; both text encoders); the family, prediction type and schedule are read from
model.path. Without a size the built-in tiny model is used (a quick demo, random weights).

Several attributes in one run (one lambda each, one compiled program, batch sharded):
  python -m launch.disentangle --config=configs/disentangle.py --config.attributes=smile,snow \
      --config.seeds=1,2,3 --workdir=workdir/multi
"""
import ml_collections

from configs import common

# name: (c0, attribute appended to make c1, seed, T*, lambda_late) -- docs/METHOD.md section 7.
PRESETS = {
    "smile": ("A photo of person", ", smiling", 42, 20, 1.0),
    "crying": ("A photo of face", ", crying", 42, 20, 1.0),
    "angry": ("A photo of person", ", angry", 42, 20, 1.0),
    "young": ("A photo of person", ", young", 34, 20, 1.0),
    "egyptian": ("A photo of person", ", Egyptian mural style", 42, 10, 1.0),
    "renaissance_weak": ("A photo of person", ", renaissance style", 42, 20, 1.0),
    "renaissance_strong": ("A photo of person", ", renaissance style", 42, 12, 1.0),
    "galaxy": ("A photo of lake", ", in milky galaxy", 21, 10, 1.2),
    "golden": ("A photo of church exterior", ", golden", 52, 10, 1.0),
    "red_brick": ("A photo of church exterior", ", red brick", 41, 12, 1.0),
    "snow": ("A photo of church exterior", ", covered by snow", 42, 12, 1.0),
    "wooden": ("A photo of church exterior", ", wooden style", 42, 12, 1.0),
    "children_drawing": ("A castle", ", children's drawing style", 42, 10, 1.15),
    "cyberpunk": ("A street view", ", Cyberpunk style", 35, 12, 1.0),
    "cherry_blossom": ("A forest", ", cherry blossom", 66, 12, 1.1),
}


def get_config(arg: str = "smile") -> ml_collections.ConfigDict:
  name, size = common.parse_preset_arg(arg, PRESETS, "configs/disentangle.py")
  prompt, attribute, seed, t_star, late = PRESETS[name]
  c = ml_collections.ConfigDict()
  c.preset = name
  c.model = common.model_config()
  c.loss_models = common.loss_models_config()
  c.prompt = prompt  # c0, the neutral prompt
  c.attribute = attribute  # c1 = prompt + attribute
  c.seeds = (seed,)  # several seeds = one lambda learned on all of them (loss averaged)
  # Preset names learned together in one compiled, sharded program: one lambda per preset
  # (its own prompts, T*, lambda_late), each on all of `seeds`. Empty = the single edit above.
  c.attributes = ()
  c.presets = {name: dict(prompt=p, attribute=a, t_star=t, lambda_late=l)
               for name, (p, a, _, t, l) in PRESETS.items()}  # read by `attributes`
  common.add_sampling(c)  # rng_seed, num_steps, guidance, sampler, eta
  c.image_size = 0  # px; 0 = the model's native size
  common.add_learning(c, t_star, late)  # t_star, lambda_late, remat, faithful, loss, optimizer
  # What is learned: "per_step" (lambda [T], the paper's) | "per_token" (lambda [T, L], one
  # weight per step and token; the pooled vector of SDXL mixes with each step's token mean)
  c.lambda_shape = "per_step"
  if size:
    common.native_size(c, size)
  return c
