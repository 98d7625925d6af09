r"""Edits a real image (docs/METHOD.md section 5): invert it, then apply or learn lambda.

  python -m launch.edit --config=configs/edit.py --workdir=workdir/edit
  python -m launch.edit --config=configs/edit.py:snow,sd --config.image=church.jpg \
      --config.weights=workdir/snow/weights.json --config.model.path=PATH/sd-v1-5 --workdir=out

Writes to the workdir: input.png (the image as the model sees it, resized and cropped),
reconstruction.png (the lambda = 0 run from the inverted inputs), edited.png, pair.png
(input | edited), metrics.json (reconstruction error in latent and pixel space; the loss
history when learning), config.json, and when learning weights.json and checkpoints/.
Everything is validated and loaded before any computation; files are published only when
complete. SD 3.x / Flux.1 models (a flow folder, model.tiny_family=sd3|flux) invert with the
Euler inversion of their flow sampler (flow_inversion.py) through the same calls.
"""
import dataclasses
import os

from absl import logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("configs/edit.py")


def _run(cfg, out_dir):
  # Light modules first: a bad image or weights file is refused within a second.
  from disentangle_jax import images, inversion, noise, real_images, weights_file, workdir  # noqa
  from disentangle_jax import checkpoint  # noqa: PLC0415
  with common.user_errors():  # validate and load everything before computing anything
    checkpoint.check_save_every(cfg.checkpoint_every)
    sampling = common.sampling(cfg)  # DDIM, eta = 0: the inversion's residuals fit only that
    inv_cfg = inversion.InversionConfig(sampling=sampling, inject_steps=cfg.inject_steps,
                                        pin=cfg.pin)
    noise.check_seeds([cfg.seed])
    loaded = real_images.load(cfg.image) if cfg.image else None
    learned = weights_file.read(cfg.weights) if cfg.weights else None
    if learned is not None:
      lam = weights_file.check_compatible(learned, sampling.num_steps,
                                          common.weights_sampler(cfg, sampling),
                                          f"weights file {cfg.weights!r}")
      prompt, target, spec = learned.prompt, learned.target_prompt, None
      if learned.guidance != cfg.guidance:
        logging.warning("weights file %r was learned with guidance %s; this run uses %s.",
                        cfg.weights, learned.guidance, cfg.guidance)
    else:
      spec = common.edit_spec(cfg, seeds=(cfg.seed,))
      prompt, target = spec.prompt, spec.target_prompt
    from disentangle_jax import disentangle, models, pipeline, run_identity  # noqa: PLC0415
    from disentangle_jax import metrics as metrics_lib  # noqa: PLC0415
    mesh = common.mesh(cfg)  # first: the weights load straight onto it
    model = common.load_model(cfg.model, mesh)
    shape = pipeline.latent_shape(model, cfg.image_size)
    loss_models = (common.load_loss_models(cfg.loss_models, model.tokenizer, mesh) if spec
                   else None)
  size = shape[0] * model.vae_scale_factor
  if loaded is None:
    pixels, notes = real_images.synthetic(size), ["no image given: a synthetic picture"]
  else:
    pixels, note = real_images.fit(loaded.pixels, size)
    notes = list(loaded.notes) + ([note] if note else [])
  for note in notes:
    logging.info("input: %s", note)

  prompts = common.encode_pair(model, prompt, target, sampling.negative_prompt)
  inverter = inversion.make_inverter(model, inv_cfg.pin)
  logging.info("encoding and inverting the image (%d steps; the first run compiles the "
               "inversion) ...", sampling.num_steps)
  inv = inversion.invert_images(inverter, model.params, pixels[None], prompts.c0, prompts.uncond,
                                [cfg.seed], inv_cfg, model.schedule, cfg.encode_sample)
  logging.info("inverted under c0=%r: %d steps, residuals in the first %d, pin=%s", prompt,
               sampling.num_steps, inv_cfg.inject_steps, inv_cfg.pin)
  history = None
  if spec is not None:
    logging.info("rendering the original (lambda = 0; compiles the sampler) ...")
    prep = disentangle.prepare(model, loss_models, spec, shape, mesh,
                               x_T=inv.run.x_T, run_noise=inv.run.noise)
    # One checkpoint folder per (image, inversion): a changed image never resumes another's run.
    key = run_identity.content_key(images.to_uint8(pixels).tobytes(), inv_cfg,
                                   cfg.encode_sample, cfg.rng_seed, cfg.model.to_dict())
    with common.user_errors():
      ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints", key[:16]),
                                     cfg.checkpoint_every)
    with ckpt:  # closed on every exit: a refusal, an error, Ctrl-C
      lam, history, prev_lam = disentangle.optimise(
          prep, spec, ckpt, log=logging.info,
          identity=common.identity(cfg, latent_shape=list(shape), image_key=key))
  use = prev_lam if spec is not None and spec.faithful else lam
  edit = inversion.make_edit_fn(
      models.predictor(model),
      models.make_decode_fn(model.vae, model.scaling_factor, model.config))
  logging.info("rendering the reconstruction and the edit (compiles the sampler) ...")
  out = edit(model.params, inv.z0, inv.run, use, prompts, sampling.guidance, inv.tables)
  metrics = {
      "mode": "apply" if spec is None else "optimise", "prompt": prompt, "target_prompt": target,
      "reconstruction": metrics_lib.reconstruction_metrics(
          inv.z0, out.z_rec, pixels[None], out.reconstruction, out.vae_roundtrip),
      "inversion": dataclasses.asdict(inv_cfg) | {"seed": cfg.seed, "rng_seed": cfg.rng_seed,
                                                  "encode_sample": cfg.encode_sample},
      "input": {"path": common.portable(cfg.image) or None, "notes": notes,
                "size": list(loaded.pixels.shape[1::-1]) if loaded else [size, size]},
      "lambda": [float(v) for v in use],
  }
  if history is not None:
    metrics["loss_history"] = history
  logging.info("reconstruction: %s", metrics["reconstruction"])

  inp = images.to_uint8(pixels)
  rec, edited = (images.to_uint8(x)[0] for x in (out.reconstruction, out.edited))
  with workdir.staged(out_dir) as staged:
    staged.write_image("input.png", images.Image.fromarray(inp))
    staged.write_image("reconstruction.png", images.Image.fromarray(rec))
    staged.write_image("edited.png", images.Image.fromarray(edited))
    staged.write_image("pair.png", images.grid([[inp, edited]], ["input", "edited"]))
    staged.write_json("metrics.json", metrics)
    staged.write_text("config.json", common.config_json(cfg))
    if spec is not None:
      w = common.learned_weights(spec, model, cfg, lam, history)
      w = dataclasses.replace(w, extra=w.extra | {"image": common.portable(cfg.image) or
                                                  "synthetic",
                                                  "inversion": metrics["inversion"]})
      staged.write_json("weights.json", w.to_json())
  print(os.path.join(out_dir, "edited.png"))


main = common.single_process_main("launch.edit", _CONFIG, _WORKDIR, _run)

if __name__ == "__main__":
  common.run(main)
