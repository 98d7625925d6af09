r"""Scores lambda schedules (learned weights files and hard-switch baselines) on many
attributes x seeds: the transfer study.

  python -m launch.study --config=configs/study.py --workdir=workdir/study
  python -m launch.study --config=configs/study.py \
      --config.weights_files=workdir/smile/weights.json --config.attributes=smile,angry \
      --config.seeds=0,1,2,3 --workdir=workdir/study

Writes to the workdir: rows.jsonl (one row per (source, attribute, seed) with every metric),
summary.csv (mean, std, 95% interval per source, overall and per attribute), summary/<source>.csv,
study.png (sources compared), study_attributes.png (source x attribute),
grid_<attribute>.png (rows = seeds; columns = c0, each source), samples/, rows/ (one file per
finished chunk) and config.json. Killed at any point, the same command resumes and ends with
the same rows, each exactly once. Several processes (hosts of a pod): --coordinator,
--num_processes, --process_id (see launch/tpu_pod.sh and the README).
"""
import json
import os
import re

from absl import logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("configs/study.py", multi_process=True)


def study_attributes(cfg):
  """The config's attributes: names of `presets`, then the "c0|appended text" items of
  `prompt_pairs` (named after the appended text: ", covered by snow" -> covered_by_snow)."""
  from disentangle_jax import study  # noqa: PLC0415
  presets = cfg.presets.to_dict()
  attributes = []
  for name in common.as_paths(cfg.attributes):
    if name not in presets:
      raise ValueError(f"attributes: {name!r} is not a preset of this config; presets: "
                       f"{', '.join(sorted(presets))}.")
    attributes.append(study.Attribute(name, presets[name]["prompt"], presets[name]["attribute"]))
  for item in (p for p in cfg.prompt_pairs.split(";") if p.strip()):
    prompt, bar, text = item.partition("|")
    if not bar or not prompt.strip() or not text.strip():
      raise ValueError(f"prompt_pairs: {item!r} is not 'c0|appended text' (e.g. 'a photo of a "
                       "shape|, covered by snow'); separate pairs with ';'.")
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "pair"
    attributes.append(study.Attribute(name, prompt.strip(), text))
  names = [a.name for a in attributes]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"attributes / prompt_pairs name {', '.join(dup)} twice; each attribute "
                     "labels its own rows and files.")
  return tuple(attributes)


def study_spec(cfg, image_paths=(), scores=()):
  """configs/study.py -> study.StudySpec (reads the weights files; validates every field).
  ``scores``: host-side score names (the toy world's judge)."""
  from disentangle_jax import study  # noqa: PLC0415
  attributes = study_attributes(cfg)
  sampling = common.sampling(cfg)
  baselines = study.baseline_sources(sampling.num_steps, common.t_stars(cfg), cfg.lambda_late,
                                     cfg.include_c1)
  files = common.as_paths(cfg.weights_files)
  sources = study.load_sources(files, sampling.num_steps, common.weights_sampler(cfg, sampling),
                               ["c0"] + [b.label for b in baselines])
  for src, path in zip(sources, files):
    logging.info("source %r: %s", src.label, path)
  sources += baselines
  seeds = (tuple(range(len(image_paths))) if image_paths
           else common.as_tuple(cfg.seeds, "seeds"))
  return study.StudySpec(
      sources=sources, attributes=tuple(attributes), seeds=seeds, images=tuple(image_paths),
      inject_steps=cfg.inject_steps, pin=cfg.pin, sampling=sampling,
      batch_size=cfg.batch_size, preprocess=cfg.preprocess, grid_seeds=cfg.grid_seeds,
      scores=tuple(scores))


def toy_judge(cfg):
  """The toy world's judge when the model is a toy world (its scores join the rows): (scores,
  a function spec -> score_fn); ((), None) for any other model."""
  from disentangle_jax.toy import evaluate, judge, world  # noqa: PLC0415
  root = world.world_root(cfg.model.path)
  if root is None:
    return (), None
  judge_config, judge_params = judge.load(os.path.join(root, world.JUDGE_DIR),
                                          f"rebuild the toy world with {world.REBUILD}.")

  def make_score_fn(spec):
    try:
      index = [evaluate.attribute_index(a.target_prompt) for a in spec.attributes]
    except ValueError as e:
      raise ValueError(f"the toy world's judge scores toy captions only: {e}") from None
    return evaluate.study_score_fn(judge_config, judge_params, index)
  return evaluate.STUDY_SCORES, make_score_fn


def main(argv):
  del argv  # common.run refused positional arguments
  import jax  # noqa: PLC0415

  cfg = _CONFIG.value
  common.setup_process()
  common.setup_distributed()
  write = jax.process_index() == 0  # every process computes; process 0 writes (and locks)
  with common.claim_workdir(_WORKDIR.value, "launch.study", lock=write) as out_dir:
    _run(cfg, out_dir, write)


def _run(cfg, out_dir, write):
  from disentangle_jax import images, inversion, metrics, models, pipeline  # noqa: PLC0415
  from disentangle_jax import plots, real_images, stats, study, study_store, workdir  # noqa
  import numpy as np  # noqa: PLC0415
  with common.user_errors():
    paths = real_images.image_files(cfg.images_dir) if cfg.images_dir else ()
    loaded = [real_images.load(p) for p in paths]  # every file checked before any compute
    scores, make_score_fn = toy_judge(cfg)
    spec = study_spec(cfg, paths, scores)
    score_fn = make_score_fn(spec) if make_score_fn else None
    mesh = common.mesh(cfg)  # first: the weights load straight onto it
    model = common.load_model(cfg.model, mesh)
    # Pairs that encode to the same tokens, refused before the manifest is written
    # (study.prepare's encoding would refuse them too, after it).
    models.check_pairs(model, [p for a in spec.attributes for p in (a.prompt, a.target_prompt)])
    shape = pipeline.latent_shape(model, cfg.image_size)
    loss_models = common.load_loss_models(cfg.loss_models, model.tokenizer, mesh)
    identity = common.identity(cfg, latent_shape=list(shape))  # the manifest's and each chunk's
    if write:  # the first write: everything above is validated
      study_store.check_manifest(out_dir, spec, identity)
  logging.info("encoding %d attribute(s) ...", len(spec.attributes))
  inputs = study.prepare(model, loss_models, spec, mesh)
  evaluate = study.make_evaluate_fn(
      models.predictor(model),
      models.make_decode_fn(model.vae, model.scaling_factor, model.config),
      spec.sampling.sampler_config(),
      metrics.from_loss_models(loss_models, spec.preprocess))
  unit_inputs = None
  if loaded:  # real images: fitted to the model's size, inverted per (attribute, image)
    size = shape[0] * model.vae_scale_factor
    fitted = [real_images.fit(im.pixels, size) for im in loaded]
    for path, (_, note) in zip(paths, fitted):
      if note:
        logging.info("%s: %s", path, note)
    logging.info("inverting %d image(s) under each attribute's c0 (compiles the inversion) ...",
                 len(loaded))
    unit_inputs = study.image_inputs(
        inversion.make_inverter(model, spec.pin), model.params,
        np.stack([px for px, _ in fitted]), inputs, spec, model.schedule)
  study_store.run(evaluate, inputs, spec, shape, mesh, out_dir, log=logging.info, write=write,
                  unit_inputs=unit_inputs, score_fn=score_fn, identity=identity)
  if not write:
    return

  logging.info("writing the rows, summaries, grids and plot ...")
  rows = study_store.merge_rows(out_dir, spec, identity)
  summary = stats.summarise(rows, spec)
  labels = ["c0"] + [s.label for s in spec.sources]
  grid_seeds = spec.seeds[:spec.grid_seeds]
  with workdir.staged(out_dir) as out:
    out.write_text("rows.jsonl", "".join(json.dumps(common.portable(r)) + "\n" for r in rows))
    out.write_text("summary.csv", stats.summary_csv(summary))
    for src in spec.sources:
      out.write_text(f"summary/{study.file_label(src.label)}.csv",
                     stats.summary_csv([r for r in summary if r["source"] == src.label]))
    for a in spec.attributes if grid_seeds else ():
      try:  # derived files: study_store.run recomputed any chunk whose samples were unreadable
        cells = [[images.load_png(study_store.sample_path(out_dir, a.name, s, label))
                  for label in labels]
                 for s in grid_seeds]
      except (OSError, ValueError, SyntaxError) as e:  # lost since (another hand): left out
        logging.warning("grid_%s.png is left out: a sample image is unreadable (%s); rerun the "
                        "same command to rebuild it.", a.name, e)
        continue
      out.write_image(f"grid_{a.name}.png",
                      images.grid(cells, labels, [str(s) for s in grid_seeds]))
    if plots.available():
      out.write_bytes("study.png", plots.study_plot(summary, spec.metric_names))
      by_attribute = "combined" if "combined" in spec.metric_names else "directional_clip"
      out.write_bytes("study_attributes.png", plots.source_attribute_plot(summary, by_attribute))
    else:
      logging.warning("matplotlib is not installed: study.png is skipped (pip install "
                      "matplotlib).")
    out.write_text("config.json", common.config_json(cfg))
  for rec in summary:
    if rec["attribute"] == "all":
      logging.info("%-12s %-18s %.4f +- %.4f", rec["source"], rec["metric"], rec["mean"],
                   rec["std"])
  print(os.path.join(out_dir, "summary.csv"))


if __name__ == "__main__":
  common.run(main)
