r"""Learns the per-step mixing weights of one attribute edit (the paper's method).

  python -m launch.disentangle --config=configs/disentangle.py:smile --workdir=workdir/smile

Writes to the workdir: original.png (pure c0), edited.png, pair.png (original | edited per
seed), strip.png (the edited image at every iteration), lambda.png, losses.png, metrics.jsonl,
weights.json (the exported lambda, for the other commands), config.json, and checkpoints/
(orbax). Killed at any point, the same command resumes and ends with the same lambda; the
iteration images (iterations/, derived files) lost or damaged meanwhile are rendered again from
the lambdas the checkpoints record.

With --config.attributes=smile,snow,... the presets are learned together in one compiled,
sharded program (one lambda each, every preset on all of `seeds`); each gets a folder
<preset>/ with its original/edited/pair/lambda images and weights.json.
"""
import json
import os

import numpy as np

from absl import logging

from launch import common

_CONFIG, _WORKDIR = common.define_flags("configs/disentangle.py")


def _run(cfg, out_dir):
  from disentangle_jax import checkpoint, disentangle, images, pipeline  # noqa: PLC0415
  from disentangle_jax import plots, workdir  # noqa: PLC0415
  with common.user_errors():
    checkpoint.check_save_every(cfg.checkpoint_every)
    names, spec = common.edit_set(cfg)  # K edits learned together (K = 1: the preset)
    edits = spec.specs
    mesh = common.mesh(cfg)  # first: the weights load straight onto it
    model = common.load_model(cfg.model, mesh)
    shape = pipeline.latent_shape(model, cfg.image_size)
    loss_models = common.load_loss_models(cfg.loss_models, model.tokenizer, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.checkpoint_every)
  with ckpt:  # closed on every exit: a refusal, an error, Ctrl-C
    identity = common.identity(cfg, latent_shape=list(shape))
    with common.user_errors():
      disentangle.check_resumable(ckpt, spec, identity)  # before any compilation
    for e in edits:
      logging.info("c0=%r c1=%r seeds=%s", e.prompt, e.target_prompt, e.seeds)
    logging.info("%d edit(s), %d steps, latents %s, %d device(s)", len(edits),
                 spec.shared.sampling.num_steps, shape, mesh.size)
    logging.info("rendering the originals (lambda = 0; the first render compiles the sampler) ...")
    prep = disentangle.prepare(model, loss_models, spec, shape, mesh)
    iter_dir = os.path.join(out_dir, "iterations")
    os.makedirs(iter_dir, exist_ok=True)

    def on_iteration(k, metrics, imgs):
      disentangle.write_iteration(iter_dir, k, metrics, images.to_uint8(imgs))

    lam, history, prev_lam = disentangle.optimise(prep, spec, ckpt, on_iteration, logging.info,
                                                  identity=identity)
    lambdas = disentangle.iteration_lambdas(ckpt, len(history), prev_lam)
  logging.info("rendering the final images ...")
  edited = images.to_uint8(disentangle.final_images(prep, spec, lam, prev_lam))
  original = images.to_uint8(prep.problem.reference[:prep.num_items])

  with workdir.staged(out_dir) as out:
    start = 0
    for k, (name, e) in enumerate(zip(names, edits)):  # one folder per edit when several
      sub = f"{name}/" if name else ""
      items = slice(start, start + len(e.seeds))
      start += len(e.seeds)
      history_k = disentangle.edit_history(history, k, e.loss.beta)
      _write_edit(out, sub, e, lam[k], original[items], edited[items], history_k)
      out.write_json(sub + "weights.json",
                     common.learned_weights(e, model, cfg, lam[k], history_k).to_json())
    strip, labels = disentangle.iteration_strip(
        iter_dir, history, lambdas,
        lambda lam_k: images.to_uint8(disentangle.render_images(prep, lam_k)),
        logging.info, logging.warning)
    if strip:
      out.write_image("strip.png", images.grid([strip], labels))
    else:
      logging.warning("strip.png is left out: no iteration image could be read or rebuilt.")
    out.write_text("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if plots.available():
      total = [dict(h, l_dir=float(np.sum(h["l_dir"])), l_perc=float(np.sum(h["l_perc"])))
               for h in history]
      out.write_bytes("losses.png", plots.loss_plot(total, spec.shared.loss.beta))
    out.write_text("config.json", common.config_json(cfg))
  for name, lam_k in zip(names, lam):
    logging.info("learned lambda%s: %s", f" ({name})" if name else "",
                 [round(float(v), 3) for v in lam_k] if np.ndim(lam_k) == 1 else
                 [[round(float(v), 3) for v in row] for row in lam_k])  # per token [T, L]
  print(os.path.join(out_dir, f"{names[0]}/weights.json" if names[0] else "weights.json"))


def _write_edit(out, sub, spec, lam, original, edited, history):
  """original / edited / pair / lambda plot of one edit (prefix ``sub``)."""
  from disentangle_jax import images, plots  # noqa: PLC0415
  rows = [str(s) for s in spec.seeds]
  out.write_image(sub + "original.png", images.grid([[o] for o in original], None, rows))
  out.write_image(sub + "edited.png", images.grid([[e] for e in edited], None, rows))
  out.write_image(sub + "pair.png", images.grid([[o, e] for o, e in zip(original, edited)],
                                                ["original", "edited"], rows))
  if plots.available():
    learned = lam if np.ndim(lam) == 1 else np.mean(lam, axis=1)  # per token: the step's mean
    out.write_bytes(sub + "lambda.png", plots.lambda_plot(spec.init_lambda(), learned))
  else:
    logging.warning("matplotlib is not installed: plots are skipped (pip install matplotlib).")


main = common.single_process_main("launch.disentangle", _CONFIG, _WORKDIR, _run)

if __name__ == "__main__":
  common.run(main)
