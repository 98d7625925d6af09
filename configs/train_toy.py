r"""Train the toy world from scratch (VAE, judge, perceptual VGG, toy CLIP, UNet).

  python -m launch.train_toy --config=configs/train_toy.py --workdir=workdir/toy
  python -m launch.train_toy --config=configs/train_toy.py:smoke --workdir=workdir/toy_smoke

The world lands in <workdir>/world; copy it to disentangle_jax/toy/weights to ship it.
":smoke" runs every stage for a few steps (checks the program end to end in minutes).
"""
import ml_collections


def _stage(steps, batch, lr):
  return ml_collections.ConfigDict(dict(steps=steps, batch=batch, lr=lr))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/train_toy.py has no variant {arg!r}; use '' or 'smoke'.")
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random number of the run (data, init, batches, noise) derives from it
  c.dataset_size = 24000  # rendered training scenes (stream 0 of the renderer)
  c.vae = _stage(900, 16, 2e-3)  # AutoencoderKL: steps, batch, Adam lr (cosine to 10%)
  c.judge_stage = _stage(1500, 64, 2e-3)  # judge: factor classifier + geometry regression
  c.perceptual = _stage(800, 64, 2e-3)  # VGG16-shaped scene classifier (the content loss's)
  c.clip = _stage(2500, 64, 1e-3)  # toy CLIP, contrastive over the 300 (partial) captions
  c.diffusion = _stage(14000, 32, 1e-3)  # UNet, epsilon prediction (text encoder frozen)
  c.kl_weight = 1e-5  # weight of the VAE's KL term (SD's VAE is near-deterministic too)
  c.uncond_prob = 0.1  # captions replaced by "" (classifier-free guidance training)
  c.omit_prob = 0.5  # each content word left out of a training caption with this probability
  c.checkpoint_every = 200  # steps between checkpoints of each stage (resume after a kill)
  c.log_every = 50  # steps between progress lines (loss, steps/s, ETA)
  c.sizes = ml_collections.ConfigDict(dict(
      unet_channels=(32, 64, 64),  # UNet block widths (multiples of 32; 3 blocks: 8 -> 2 px)
      unet_heads=4,  # UNet attention heads
      vae_channels=(16, 32, 32),  # VAE block widths: 3 blocks = 32 px -> 8 x 8 latents
      vae_groups=8,  # VAE GroupNorm groups
      clip_width=64,  # toy CLIP tower widths (its text tower is SD's text encoder, frozen)
      clip_layers=2,  # toy CLIP layers per tower
      clip_patch=4,  # toy CLIP patch size
      clip_projection=32,  # toy CLIP embedding width
  ))
  if arg == "smoke":
    c.dataset_size = 256
    for name in ("vae", "judge_stage", "perceptual", "clip", "diffusion"):
      c[name].steps = 4
    c.checkpoint_every = 2
    c.log_every = 2
  return c
