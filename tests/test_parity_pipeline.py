"""Full CFG sampling runs match diffusers' PyTorch pipelines step by step (float32, tiny weights).

The weights are created by diffusers' PyTorch classes and saved as safetensors
(conftest.torch_sd_dir); we load them with our own converter. Each step's latents must agree to
<= 1e-4 relative (max abs error / max abs value), and so must the decoded images.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import mixing, models, noise, sampler, schedule

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install torch==2.13.0")
import diffusers  # noqa: E402  (its PyTorch classes need torch)

NUM_STEPS = 12
GUIDANCE = 7.5
SEEDS = [4, 9]
PROMPTS = ("a photo of person", "a photo of person, smiling")
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(torch_sd_dir):
  path, torch_modules = torch_sd_dir
  model = models.load(models.ModelConfig(path=str(path)))
  return model, torch_modules


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_embeddings(tm):
  ids = tm["tokenizer"](list(PROMPTS) + [""], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return tm["text_encoder"](ids)[0]


def _scheduler(kind):
  cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             set_alpha_to_one=False, steps_offset=1)
  if kind == "ddim":
    return diffusers.DDIMScheduler(clip_sample=False, **cfg)
  return diffusers.PNDMScheduler(skip_prk_steps=True, **cfg)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _ours(model, kind, eta, lam):
  tables = schedule.step_tables(model.schedule, NUM_STEPS, eta)
  rn = noise.draw(jax.random.key(0), SEEDS, (8, 8, 4), tables.sigma)
  c0, c1, un = models.encode_prompts(model, list(PROMPTS) + [""])
  eps, decode = models.make_eps_fn(model.unet), models.make_decode_fn(model.vae,
                                                                     model.scaling_factor)

  @jax.jit  # one program (called eagerly, every op of the decoder would be compiled apart)
  def run(params, x_T, noise_, lam, c0, c1, un):
    traj = sampler.sample(eps, params["unet"], x_T, noise_, mixing.mix(lam, c0, c1), un,
                          GUIDANCE, tables, sampler.SamplerConfig(kind), trajectory=True)
    return traj, decode(params["vae"], traj[-1])
  traj, images = run(model.params, rn.x_T, rn.noise, jnp.asarray(lam), c0, c1, un)
  z = rn.noise / np.maximum(tables.sigma, 1e-30).reshape(-1, 1, 1, 1, 1)  # the unit Gaussians
  return rn, z, np.asarray(traj), np.asarray(images)


def _torch_decode(tm, latents):
  with torch.no_grad():
    img = tm["vae"].decode(latents / 0.18215).sample
  return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.6), ("plms", 0.0)])
def test_sampling_matches_diffusers_step_by_step(setup, kind, eta):
  model, tm = setup
  lam = mixing.hard_switch(NUM_STEPS, 4, 1.1)
  rn, z, traj, images = _ours(model, kind, eta, lam)

  emb = _torch_embeddings(tm)
  c0, c1, un = emb[0:1], emb[1:2], emb[2:3]
  cond = [float(l) * c1 + (1 - float(l)) * c0 for l in lam]
  sched = _scheduler(kind)
  sched.set_timesteps(NUM_STEPS)
  # PNDM makes one extra model call on its first step, with the first step's embedding.
  cond_per_call = cond if kind == "ddim" else [cond[0]] + cond
  x = _nchw(rn.x_T)
  b = x.shape[0]
  ref_traj = []
  for k, t in enumerate(sched.timesteps):
    emb_k = torch.cat([un.expand(b, -1, -1), cond_per_call[k].expand(b, -1, -1)])
    with torch.no_grad():
      e = tm["unet"](torch.cat([x, x]), t, encoder_hidden_states=emb_k).sample
    e_u, e_c = e.chunk(2)
    e = e_u + GUIDANCE * (e_c - e_u)
    kwargs = {"eta": eta, "variance_noise": _nchw(z[k])} if kind == "ddim" else {}
    x = sched.step(e, t, x, **kwargs).prev_sample
    if kind == "ddim" or k != 0:  # PNDM's first call only prepares the pseudo Euler step
      ref_traj.append(x.permute(0, 2, 3, 1).numpy())
  assert len(ref_traj) == NUM_STEPS
  errs = [_rel_err(traj[i], ref_traj[i]) for i in range(NUM_STEPS)]
  img_err = _rel_err(images, _torch_decode(tm, x))
  print(f"{kind} eta={eta}: max per-step latent rel. error {max(errs):.2e}, image {img_err:.2e}")
  assert max(errs) <= REL_TOL, f"per-step relative errors {errs}"
  assert img_err <= REL_TOL


def test_matches_diffusers_stable_diffusion_pipeline(setup):
  """The same run through diffusers' own StableDiffusionPipeline (per-step embeddings set by
  its step-end callback)."""
  model, tm = setup
  lam = mixing.hard_switch(NUM_STEPS, 5)
  rn, _, traj, images = _ours(model, "ddim", 0.0, lam)
  emb = _torch_embeddings(tm)
  c0, c1, un = emb[0:1], emb[1:2], emb[2:3]
  b = len(SEEDS)
  cond = [(float(l) * c1 + (1 - float(l)) * c0).expand(b, -1, -1) for l in lam]
  pipe = diffusers.StableDiffusionPipeline(
      vae=tm["vae"], text_encoder=tm["text_encoder"], tokenizer=tm["tokenizer"], unet=tm["unet"],
      scheduler=_scheduler("ddim"), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  seen = []

  def on_step_end(pipe_, i, t, kw):
    seen.append(kw["latents"].permute(0, 2, 3, 1).numpy())
    if i + 1 < NUM_STEPS:  # the batch is [uncond; cond] under CFG
      kw["prompt_embeds"] = torch.cat([un.expand(b, -1, -1), cond[i + 1]])
    return kw

  with torch.no_grad():
    out = pipe(prompt_embeds=cond[0], negative_prompt_embeds=un.expand(b, -1, -1),
               latents=_nchw(rn.x_T), num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE,
               height=64, width=64, output_type="np", callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
  errs = [_rel_err(traj[i], seen[i]) for i in range(NUM_STEPS)]
  print(f"StableDiffusionPipeline: max per-step latent rel. error {max(errs):.2e}, image "
        f"{_rel_err(images, out):.2e}")
  assert max(errs) <= REL_TOL, f"per-step relative errors {errs}"
  assert _rel_err(images, out) <= REL_TOL
