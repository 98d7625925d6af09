r"""Renders the hard-switch grid of docs/METHOD.md section 1 (the paper's finding).

  python -m launch.switch --config=configs/switch.py --workdir=workdir/switch
  python -m launch.switch --config=configs/switch.py:sd --config.model.path=PATH/sd-v1-5 \
      --config.seeds=42,7 --workdir=workdir/switch_sd

Writes grid.png (rows = seeds; columns = pure c0, a switch after each T*, pure c1, then one
column per file in lambda_files, e.g. weights.json learned by launch.disentangle),
images/seed<S>_<column>.png, lambdas.json and config.json to the workdir.
"""
import os

from absl import logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("configs/switch.py")


def _run(cfg, out_dir):
  from disentangle_jax import images, pipeline, switch_grid, workdir  # noqa: PLC0415
  with common.user_errors():
    sampling = common.sampling(cfg)
    t_stars = common.t_stars(cfg)
    learned = switch_grid.load_columns(common.as_paths(cfg.lambda_files), sampling.num_steps,
                                       common.weights_sampler(cfg, sampling),
                                       switch_grid.builtin_labels(t_stars))
    for (label, _), path in zip(learned, common.as_paths(cfg.lambda_files)):
      logging.info("column %r: %s", label, path)
    spec = switch_grid.GridSpec(
        prompt=cfg.prompt, attribute=cfg.attribute, seeds=common.as_tuple(cfg.seeds, "seeds"),
        t_stars=t_stars, sampling=sampling, lambda_late=cfg.lambda_late,
        batch_size=cfg.batch_size, learned=learned)
    model = common.load_model(cfg.model, common.mesh(cfg))  # split over mesh.model
    shape = pipeline.latent_shape(model, cfg.image_size)
  from disentangle_jax import models  # noqa: PLC0415
  prompts = common.encode_pair(model, spec.prompt, spec.target_prompt,
                               spec.sampling.negative_prompt)
  render = pipeline.make_render_fn(
      models.predictor(model),
      models.make_decode_fn(model.vae, model.scaling_factor, model.config),
      spec.sampling.sampler_config())
  logging.info("c0=%r c1=%r, %d seeds x %d columns, latents %s", spec.prompt,
               spec.target_prompt, len(spec.seeds), len(spec.columns()), shape)
  logging.info("rendering (the first batch compiles the sampler) ...")
  grid = switch_grid.run(render, model.params, prompts, spec, shape, model.schedule,
                         log=logging.info)

  labels = [label for label, _ in spec.columns()]
  pixels = images.to_uint8(grid)
  with workdir.staged(out_dir) as out:
    for s, seed in enumerate(spec.seeds):
      for k, label in enumerate(labels):
        out.write_image(f"images/seed{seed}_{switch_grid.file_label(label)}.png",
                        images.Image.fromarray(pixels[s, k]))
    out.write_image("grid.png", images.grid(pixels, labels, [str(s) for s in spec.seeds]))
    out.write_json("lambdas.json", {label: lam.tolist() for label, lam in spec.columns()})
    out.write_text("config.json", common.config_json(cfg))
  logging.info("wrote %s", os.path.join(out_dir, "grid.png"))
  print(os.path.join(out_dir, "grid.png"))


main = common.single_process_main("launch.switch", _CONFIG, _WORKDIR, _run)

if __name__ == "__main__":
  common.run(main)
