"""The flow-matching schedule and Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler,
StableDiffusion3Pipeline (per-step mixing through its step callback, VAE decode), a manual
loop of the scheduler and FluxTransformer2DModel (FluxPipeline cannot swap the pooled vector per
step), FluxPipeline itself at a constant lambda (the manual loop's conventions, VAE decode), and
d(loss)/d(lambda) against central finite differences in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from disentangle_jax import errors, flow_sampler, flow_schedule, mixing, sampler, schedule
from disentangle_jax.models import dit_convert, flow_bundle, flow_vae, flux, mmdit
from tests import flow_tiny

# The released scheduler_config.json of SD 3.5 (medium / large) and Flux.1-dev.
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _diffusers_scheduler(config):
  return FlowMatchEulerDiscreteScheduler.from_config(config)


def _saved_vae_decoder(folder):
  """The decode function and weights of the 16-channel VAE a test saved in diffusers layout."""
  vae_cfg = dit_convert.read_config(str(folder))
  vae = flow_vae.build_vae(vae_cfg)
  params = flow_vae.vae_params(dit_convert.read_state_dict(str(folder)), vae, vae_cfg)
  return flow_vae.make_decode_fn(vae, vae_cfg["scaling_factor"], vae_cfg["shift_factor"]), params


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("pixels", [(256, 256), (512, 768), (1024, 1024)])
def test_sd3_tables_equal_diffusers(num_steps, pixels):
  """StableDiffusion3Pipeline: set_timesteps(T) with the static shift (sigmas and timesteps bit
  for bit; the resolution does not enter)."""
  del pixels
  sched = _diffusers_scheduler(SD35_SCHEDULER)
  sched.set_timesteps(num_steps)
  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig.from_diffusers_config(
      SD35_SCHEDULER), num_steps, "sd3")
  np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())
  np.testing.assert_array_equal(tables.sigma, sched.sigmas[:-1].numpy())
  np.testing.assert_array_equal(tables.sigma_next, sched.sigmas[1:].numpy())


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
@pytest.mark.parametrize("pixels", [(256, 256), (512, 768), (1024, 1024), (1360, 768)])
def test_flux_tables_equal_diffusers(num_steps, pixels):
  """FluxPipeline: sigmas linspace(1, 1/T, T) and mu from the packed image token count."""
  seq_len = flow_schedule.image_seq_len(pixels[0] // 8, pixels[1] // 8)
  mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
  cfg = flow_schedule.FlowScheduleConfig.from_diffusers_config(FLUX_SCHEDULER)
  assert flow_schedule.calculate_shift(seq_len, cfg) == mu
  sched = _diffusers_scheduler(FLUX_SCHEDULER)
  sched.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
  tables = flow_schedule.tables(cfg, num_steps, "flux", seq_len=seq_len)
  np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())
  np.testing.assert_array_equal(tables.sigma, sched.sigmas[:-1].numpy())
  np.testing.assert_array_equal(tables.sigma_next, sched.sigmas[1:].numpy())


def test_dynamic_shift_without_passed_sigmas_equals_diffusers():
  """An SD3-style pipeline on a dynamically shifting scheduler (mu given, no sigmas)."""
  sched = _diffusers_scheduler(FLUX_SCHEDULER)
  sched.set_timesteps(7, mu=0.8)
  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig.from_diffusers_config(
      FLUX_SCHEDULER), 7, "sd3", mu=0.8)
  np.testing.assert_array_equal(tables.sigma, sched.sigmas[:-1].numpy())
  np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())


def test_schedule_refuses_what_it_does_not_run():
  with pytest.raises(errors.UserError, match="use_karras_sigmas"):
    flow_schedule.FlowScheduleConfig.from_diffusers_config({"use_karras_sigmas": True})
  with pytest.raises(errors.UserError, match="seq_len"):
    flow_schedule.tables(flow_schedule.FlowScheduleConfig(use_dynamic_shifting=True), 4, "flux")
  with pytest.raises(errors.UserError, match="sampler.remat"):
    flow_sampler.FlowSamplerConfig(remat="everything")


def _prompts(seed, pooled_width=10):
  """(c0, c1, negative) as {"tokens": [L, 12], "pooled": [1, P]} numpy float32."""
  rng = np.random.default_rng(seed)
  make = lambda: {"tokens": rng.normal(size=(flow_tiny.TEXT_LEN, 12)).astype(np.float32),  # pylint: disable=g-long-lambda
                  "pooled": rng.normal(size=(1, pooled_width)).astype(np.float32)}
  return make(), make(), make()


def _mix_torch(lam, c0, c1):
  """The convex mix of mixing.py in torch float32, batch of B = 1."""
  return {k: torch.from_numpy(lam * c1[k] + (1 - lam) * c0[k])[None] for k in c0}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  model = flow_tiny.torch_sd3()
  cfg, params = flow_tiny.saved_and_converted(model, str(tmp_path_factory.mktemp("sd3")))
  return model, cfg, params


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
  model = flow_tiny.torch_flux()
  cfg, params = flow_tiny.saved_and_converted(model, str(tmp_path_factory.mktemp("flux")))
  return model, cfg, params


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_sd3_pipeline_with_per_step_mixing(sd3, tmp_path):
  """StableDiffusion3Pipeline itself as the oracle: a negative prompt, CFG 4.5, random per-step
  lambda on tokens and pooled vector (swapped by its step callback), then the VAE decode: every
  step's latents and the decoded image equal ours (one jitted sample + decode)."""
  model, cfg, params = sd3
  num_steps, guidance = 3, 4.5
  lam = np.random.default_rng(0).uniform(-0.2, 1.2, num_steps).astype(np.float32)
  c0, c1, neg = _prompts(1)
  x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
  tvae = flow_tiny.torch_vae()
  tvae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
  pipe = StableDiffusion3Pipeline(
      transformer=model, scheduler=_diffusers_scheduler(SD35_SCHEDULER), vae=tvae,
      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
      text_encoder_3=None, tokenizer_3=None)
  pipe.set_progress_bar_config(disable=True)
  negative = {k: torch.from_numpy(v)[None] for k, v in neg.items()}
  steps = []

  def next_step_embeddings(pipe, i, t, kwargs):  # the callback sets step i + 1's conditioning
    del pipe, t
    steps.append(kwargs["latents"].numpy())
    if i + 1 == num_steps:
      return {}
    mixed = _mix_torch(lam[i + 1], c0, c1)
    return {"prompt_embeds": torch.cat([negative["tokens"], mixed["tokens"]]),
            "pooled_prompt_embeds": torch.cat([negative["pooled"][:, 0],
                                               mixed["pooled"][:, 0]])}

  first = _mix_torch(lam[0], c0, c1)
  with torch.no_grad():
    image = pipe(prompt_embeds=first["tokens"], pooled_prompt_embeds=first["pooled"][:, 0],
                 negative_prompt_embeds=negative["tokens"],
                 negative_pooled_prompt_embeds=negative["pooled"][:, 0], latents=x_T,
                 height=16, width=16, num_inference_steps=num_steps, guidance_scale=guidance,
                 output_type="np", callback_on_step_end=next_step_embeddings,
                 callback_on_step_end_tensor_inputs=["latents"]).images

  decode, vae_params = _saved_vae_decoder(tmp_path / "vae")
  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig.from_diffusers_config(
      SD35_SCHEDULER), num_steps, "sd3")
  fn = flow_sampler.sd3_velocity_fn(mmdit.MMDiT(cfg))

  @jax.jit
  def run(params, vae_params, lam):
    xs = flow_sampler.sample(fn, params, jnp.asarray(flow_tiny.nchw_to_nhwc(x_T)),
                             mixing.mix(lam, c0, c1), neg, guidance, tables, trajectory=True)
    return xs, decode(vae_params, xs[-1])

  got, got_image = run(params, vae_params, lam)
  for i in range(num_steps):
    assert _rel(flow_tiny.nhwc_to_nchw(got[i]), steps[i]) < 1e-4, i
  assert got_image.shape == image.shape == (1, 16, 16, 3)
  assert _rel(got_image, image) < 1e-4
  run(params, vae_params, lam[::-1].copy())  # another lambda: the same program
  assert run._cache_size() == 1  # pylint: disable=protected-access


def test_flux_guidance_embedding_mixing_matches_manual_diffusers_loop(flux_model):
  """Flux.1-dev style: distilled guidance 3.5 as a model input (no CFG), dynamic shift from the
  token count, packed latents; random per-step lambda on the T5 tokens and the pooled CLIP
  vector (FluxPipeline's callback cannot swap the pooled vector: hence the manual loop)."""
  model, cfg, params = flux_model
  num_steps, h, w = 3, 8, 4
  lam = np.random.default_rng(1).uniform(-0.2, 1.2, num_steps).astype(np.float32)
  c0, c1, _ = _prompts(2)
  x_T = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(6))
  seq_len = flow_schedule.image_seq_len(h, w)
  sched = _diffusers_scheduler(FLUX_SCHEDULER)
  sched.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                      mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
  txt_ids, img_ids = flow_tiny.flux_ids(h, w)
  latents, expected = flow_tiny.torch_pack(x_T), []
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      mixed = _mix_torch(lam[i], c0, c1)
      v = model(latents, mixed["tokens"], mixed["pooled"][:, 0], t.expand(1) / 1000, img_ids,
                txt_ids, torch.full([1], 3.5)).sample
      latents = sched.step(v, t, latents).prev_sample
      expected.append(flow_tiny.torch_unpack(latents, h, w).numpy())

  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig.from_diffusers_config(
      FLUX_SCHEDULER), num_steps, "flux", seq_len=seq_len)
  fn = flow_sampler.flux_velocity_fn(flux.Flux(cfg))
  got = jax.jit(lambda p, lam: flow_sampler.sample(
      fn, p, jnp.asarray(flow_tiny.nchw_to_nhwc(x_T)), mixing.mix(lam, c0, c1), None, 1.0,
      tables, flow_sampler.FlowSamplerConfig(cfg=False), embedded_guidance=3.5,
      trajectory=True))(params, lam)
  for i in range(num_steps):
    assert _rel(flow_tiny.nhwc_to_nchw(got[i]), expected[i]) < 1e-4, i


def test_flux_pipeline_at_a_constant_lambda(flux_model, tmp_path):
  """FluxPipeline itself as the oracle where it can be one: a constant lambda (its step
  callback swaps the tokens but not the pooled vector, so per-step mixing is the manual loop's,
  above), distilled guidance (its guidance_scale, here 2.5), mu from the packed token count, its
  own text and image ids; every step's latents and the decoded image equal ours. The programs'
  path (flow_bundle.FlowPredictor.sample) takes their `guidance` as that guidance_scale: the
  same latents at 2.5, others at 4.5, one program. Then true CFG (a negative prompt, its
  true_cfg_scale) equals flow_sampler's CFG path."""
  model, cfg, params = flux_model
  num_steps, h, w, lam, guidance = 3, 8, 4, np.float32(0.3), 2.5
  c0, c1, _ = _prompts(3)
  x_T = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(7))
  tvae = flow_tiny.torch_vae()
  tvae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
  scale = 2 ** (len(tvae.config.block_out_channels) - 1)  # FluxPipeline's vae_scale_factor
  pipe = FluxPipeline(transformer=model, scheduler=_diffusers_scheduler(FLUX_SCHEDULER),
                      vae=tvae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                      tokenizer_2=None)
  pipe.set_progress_bar_config(disable=True)
  steps = []

  def record(pipe, i, t, kwargs):
    del pipe, i, t
    steps.append(flow_tiny.torch_unpack(kwargs["latents"], h, w).numpy())
    return {}

  mixed = _mix_torch(lam, c0, c1)
  with torch.no_grad():
    image = pipe(prompt_embeds=mixed["tokens"], pooled_prompt_embeds=mixed["pooled"][:, 0],
                 latents=flow_tiny.torch_pack(x_T), height=h * scale, width=w * scale,
                 num_inference_steps=num_steps, guidance_scale=guidance, output_type="np",
                 callback_on_step_end=record,
                 callback_on_step_end_tensor_inputs=["latents"]).images

  decode, vae_params = _saved_vae_decoder(tmp_path / "vae")
  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig.from_diffusers_config(
      FLUX_SCHEDULER), num_steps, "flux", seq_len=flow_schedule.image_seq_len(h, w))
  fn = flow_sampler.flux_velocity_fn(flux.Flux(cfg))

  @jax.jit
  def run(params, vae_params):
    xs = flow_sampler.sample(fn, params, jnp.asarray(flow_tiny.nchw_to_nhwc(x_T)),
                             mixing.mix(jnp.full(num_steps, lam), c0, c1), None, 1.0, tables,
                             flow_sampler.FlowSamplerConfig(cfg=False),
                             embedded_guidance=guidance, trajectory=True)
    return xs, decode(vae_params, xs[-1])

  got, got_image = run(params, vae_params)
  assert len(steps) == num_steps
  for i in range(num_steps):
    assert _rel(flow_tiny.nhwc_to_nchw(got[i]), steps[i]) < 1e-4, i
  assert got_image.shape == image.shape == (1, h * scale, w * scale, 3)
  assert _rel(got_image, image) < 1e-4

  predictor = flow_bundle.FlowPredictor(flow_bundle.FlowNet(
      "flux", cfg, flow_schedule.FlowScheduleConfig.from_diffusers_config(FLUX_SCHEDULER)))
  programs = jax.jit(lambda p, g: predictor.sample(
      p, jnp.asarray(flow_tiny.nchw_to_nhwc(x_T)), None,
      mixing.mix(jnp.full(num_steps, lam), c0, c1), None, g,
      schedule.step_tables(schedule.ScheduleConfig(), num_steps), sampler.SamplerConfig()))
  assert _rel(flow_tiny.nhwc_to_nchw(programs(params, guidance)), steps[-1]) < 1e-4
  assert _rel(flow_tiny.nhwc_to_nchw(programs(params, guidance + 2)), steps[-1]) > 1e-2

  # Flux's "true CFG" (FluxPipeline with a negative prompt and true_cfg_scale > 1, on top of the
  # distilled guidance): flow_sampler's CFG path on the Flux velocity (library level; the
  # programs refuse a negative prompt on Flux, flow_settings.py). Every step's latents equal.
  neg, true_cfg, true_steps = c1, 2.0, []  # c1 as the negative: any other embedding would do
  negative = {k: torch.from_numpy(v)[None] for k, v in neg.items()}
  with torch.no_grad():
    pipe(prompt_embeds=mixed["tokens"], pooled_prompt_embeds=mixed["pooled"][:, 0],
         negative_prompt_embeds=negative["tokens"],
         negative_pooled_prompt_embeds=negative["pooled"][:, 0], true_cfg_scale=true_cfg,
         latents=flow_tiny.torch_pack(x_T), height=h * scale, width=w * scale,
         num_inference_steps=num_steps, guidance_scale=guidance, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: true_steps.append(
             flow_tiny.torch_unpack(kw["latents"], h, w).numpy()) or {},
         callback_on_step_end_tensor_inputs=["latents"])
  got = jax.jit(lambda p: flow_sampler.sample(
      fn, p, jnp.asarray(flow_tiny.nchw_to_nhwc(x_T)), mixing.mix(jnp.full(num_steps, lam), c0,
                                                                  c1),
      neg, true_cfg, tables, flow_sampler.FlowSamplerConfig(cfg=True),
      embedded_guidance=guidance, trajectory=True))(params)
  assert len(true_steps) == num_steps
  for i in range(num_steps):
    assert _rel(flow_tiny.nhwc_to_nchw(got[i]), true_steps[i]) < 1e-4, i
  assert _rel(true_steps[-1], steps[-1]) > 1e-2  # true CFG did change the result
  assert programs._cache_size() == 1  # pylint: disable=protected-access


def _float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _check_gradient(loss, lam):
  """jax.grad of loss at lam against central differences, every component, 1e-5 relative."""
  value_and_grad = jax.jit(jax.value_and_grad(loss))  # one program for both (test time)
  grad = np.asarray(value_and_grad(lam)[1])
  f = lambda lam: value_and_grad(lam)[0]  # pylint: disable=unnecessary-lambda-assignment
  eps = 1e-5
  fd = np.array([(f(lam + eps * e) - f(lam - eps * e)) / (2 * eps) for e in np.eye(len(lam))])
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())
  assert np.abs(grad).min() > 0  # every step's weight reaches the loss


def test_sd3_lambda_gradient_equals_finite_differences():
  """d(loss)/d(lambda) through the CFG Euler scan with step remat, float64, on a one-layer
  MMDiT (dual attention and the context_pre_only ending in one block; random Flax weights)."""
  cfg = mmdit.MMDiTConfig(**{**flow_tiny.SD3_CONFIG, "num_layers": 1})
  with jax.enable_x64(True):
    shapes = dit_convert.sd3_shapes(cfg)
    rng = np.random.default_rng(8)
    params64 = jax.tree.map(lambda s: 0.3 * rng.normal(size=s.shape), shapes)
    c0, c1, neg = (_float64(c) for c in _prompts(3))
    x_T = np.random.default_rng(4).normal(size=(1, 4, 4, 4))
    tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig(shift=3.0), 2, "sd3")
    fn = flow_sampler.sd3_velocity_fn(mmdit.MMDiT(cfg, dtype=jnp.float64))
    target = np.random.default_rng(5).normal(size=x_T.shape)

    def loss(lam):
      x0 = flow_sampler.sample(fn, params64, jnp.asarray(x_T), mixing.mix(lam, c0, c1), neg,
                               4.5, tables, flow_sampler.FlowSamplerConfig(remat="full"))
      return jnp.sum((x0 - target) ** 2)

    _check_gradient(loss, np.array([0.3, 0.8]))


def test_flux_lambda_gradient_equals_finite_differences(flux_model):
  """The same through Flux with its guidance embedding (no CFG), float64."""
  _, cfg, params = flux_model
  with jax.enable_x64(True):
    params64 = _float64(params)
    c0, c1, _ = (_float64(c) for c in _prompts(4))
    x_T = np.random.default_rng(6).normal(size=(1, 4, 4, 4))
    tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig(**{
        k: v for k, v in FLUX_SCHEDULER.items() if k != "_class_name"}), 2, "flux", seq_len=4)
    fn = flow_sampler.flux_velocity_fn(flux.Flux(cfg, dtype=jnp.float64))
    target = np.random.default_rng(7).normal(size=x_T.shape)

    def loss(lam):
      x0 = flow_sampler.sample(fn, params64, jnp.asarray(x_T), mixing.mix(lam, c0, c1), None,
                               1.0, tables, flow_sampler.FlowSamplerConfig(cfg=False),
                               embedded_guidance=3.5)
      return jnp.sum((x0 - target) ** 2)

    _check_gradient(loss, np.array([0.3, 0.8]))
