r"""The paper's results in the toy world: hard switches, pure c1 and learned lambda, judged.

  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error python benchmarks/toy_world.py \
      [--seeds 32] [--num_steps 50] [--t_stars 10,20,30] [--iterations 10] [--batch_seeds 8]

For every attribute (a fixed c0 prompt and c1 = c0 + the attribute, as the release's presets)
and every seed, the same x_T and noise are rendered under each method:

  c1          lambda = 1 at every step (pure target prompt)
  switch T*   lambda = 0 for the first T* steps, 1 after
  learned     lambda learned on that seed alone (Adam, 10 iterations, the paper's objective
              with the toy CLIP and the VGG of the configs)
  batch       one lambda learned on the first --batch_seeds seeds together, applied to all
  transfer    the lambda learned on the first seed alone, applied to every seed

and scored against the pure-c0 image of the seed: the judge's attribute success, content
preservation (shape, colour, position unchanged) and both ("combined"), directional CLIP
(toy CLIP) and the VGG content distance; means with 95% intervals. Writes the table
(toy_world.md) and a figure per attribute (rows seeds, columns methods) into --out.
"""
from __future__ import annotations

import argparse
import os
import time

import harness

harness.add_repo_to_path()
harness.quiet_libraries()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from disentangle_jax import disentangle, images, loss_models, metrics, mixing, models  # noqa
from disentangle_jax import noise, optimize, parallel, pipeline, sampler, sampling, schedule  # noqa
from disentangle_jax import stats  # noqa: E402
from disentangle_jax.toy import evaluate, judge, scenes, world  # noqa: E402

from configs import toy as toy_configs  # noqa: E402

# attribute name in the renderer: configs/toy.py preset (c0, attribute text, seed, T*, late).
PRESETS = {"smiling": toy_configs.PRESETS["smiling"], "wooden": toy_configs.PRESETS["wooden"],
           "snow": toy_configs.PRESETS["snow"], "night": toy_configs.PRESETS["night"]}
METRICS = ("attribute_success", "content_preserved", "combined", "directional_clip",
           "content_distance")


def render_columns(w, c0, c1, seeds, lams: dict, num_steps: int) -> dict:
  """{method: images [S, h, w, 3]} for lambda [T] or [T, S] per method (same x_T, noise)."""
  sd = w.sd
  emb = models.encode_prompts(sd, [c0, c1, ""])
  tables = schedule.step_tables(sd.schedule, num_steps)
  run = noise.draw(jax.random.key(0), np.asarray(seeds),
                   (sd.latent_size, sd.latent_size, sd.latent_channels), tables.sigma)
  render = pipeline.make_render_fn(models.make_eps_fn(sd.unet),
                                   models.make_decode_fn(sd.vae, sd.scaling_factor),
                                   sampler.SamplerConfig("ddim"))
  prompts = pipeline.PromptPair(emb[0], emb[1], emb[2])
  out = {}
  for name, lam in lams.items():
    lam = np.asarray(lam, np.float32)
    lam = np.broadcast_to(lam[:, None], (num_steps, len(seeds))) if lam.ndim == 1 else lam
    out[name] = np.asarray(render(sd.params, run.x_T, run.noise, jnp.asarray(lam), prompts,
                                  evaluate.GUIDANCE, tables))
  return out


def learn(w, c0, text, seeds, args, t_init: int, together: bool) -> np.ndarray:
  """Learned lambda [S, T] (one per seed) or [T] (one for all seeds), from a switch at t_init."""
  common = dict(prompt=c0, attribute=text, t_star=t_init,
                sampling=sampling.SamplingConfig(num_steps=args.num_steps,
                                                 guidance=evaluate.GUIDANCE),
                loss=optimize.LossConfig(preprocess="standard"),
                optimizer=optimize.OptimizerConfig(iterations=args.iterations))
  if together:
    spec = disentangle.EditSpec(seeds=tuple(seeds), **common)
  else:
    spec = disentangle.EditSet(tuple(disentangle.EditSpec(seeds=(s,), **common) for s in seeds))
  sd = w.sd
  prep = disentangle.prepare(sd, w.loss_models, spec, (sd.latent_size, sd.latent_size,
                                                       sd.latent_channels),
                             parallel.make_mesh())
  lam, _, _ = disentangle.optimise(prep, spec, log=lambda m: None)
  return lam


def score(w, attribute: int, c0, c1, columns: dict) -> dict:
  """{method: {metric: [S] values}} against columns["original"]."""
  lm = w.loss_models
  text = loss_models.encode_texts(lm, [c0, c1])
  nets = metrics.from_loss_models(lm, "standard")
  original = columns["original"]
  pred0 = evaluate.judge_predict(w, original)
  out = {}
  for name, imgs in columns.items():
    if name == "original":
      continue
    n = len(imgs)
    m = metrics.item_metrics(nets, lm.params, jnp.asarray(original), jnp.asarray(imgs),
                             jnp.broadcast_to(text[0], (n, text.shape[1])),
                             jnp.broadcast_to(text[1], (n, text.shape[1])))
    out[name] = {**judge.score_edits(pred0, evaluate.judge_predict(w, imgs), attribute),
                 **{k: np.asarray(v) for k, v in m.items()}}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--weights", default=world.WEIGHTS_DIR)
  parser.add_argument("--seeds", type=int, default=32)
  parser.add_argument("--num_steps", type=int, default=50)
  parser.add_argument("--t_stars", default="10,20,30")
  parser.add_argument("--t_init", type=int, default=0,
                      help="hard-switch init of learning; 0 = the preset's T* (configs/toy.py)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--batch_seeds", type=int, default=8)
  parser.add_argument("--attributes", default=",".join(PRESETS))
  parser.add_argument("--no_learn", action="store_true", help="switches and c1 only")
  parser.add_argument("--figure_seeds", type=int, default=6)
  parser.add_argument("--out", default="benchmarks/toy_world")
  args = parser.parse_args()
  machine = harness.machine_report()
  print(machine)
  w = world.load(args.weights)
  seeds = list(range(args.seeds))
  t_stars = [int(t) for t in args.t_stars.split(",")]
  os.makedirs(args.out, exist_ok=True)
  table = []
  for name in args.attributes.split(","):
    t0 = time.time()
    attribute = scenes.ATTRIBUTES.index(name)
    c0, text, _, t_star, _ = PRESETS[name]
    c1 = c0 + text
    assert scenes.parse_caption(c1)[3] == attribute, (c1, name)
    t_init = args.t_init or round(t_star * args.num_steps / 50)
    lams = {"original": np.zeros(args.num_steps), "c1": np.ones(args.num_steps)}
    lams.update({f"T*{t}": mixing.hard_switch(args.num_steps, t) for t in t_stars})
    if not args.no_learn:
      per_seed = learn(w, c0, text, seeds, args, t_init, together=False)  # [S, T]
      lams["learned"] = per_seed.T
      lams["batch"] = learn(w, c0, text, seeds[:args.batch_seeds], args, t_init, together=True)
      lams["transfer"] = per_seed[0]
    columns = render_columns(w, c0, c1, seeds, lams, args.num_steps)
    scores = score(w, attribute, c0, c1, columns)
    for method, ms in scores.items():
      sel = slice(1, None) if method == "transfer" else slice(None)  # transfer: other seeds
      table.append([name, method] + [_fmt(stats.interval(ms[k][sel])) for k in METRICS])
      print(" | ".join(table[-1]), flush=True)
    rows = [[images.to_uint8(columns[m][i]) for m in columns] for i in range(args.figure_seeds)]
    images.grid(rows, list(columns), [str(s) for s in seeds[:args.figure_seeds]]).save(
        os.path.join(args.out, f"{name}.png"))
    print(f"{name}: {c0!r} -> {c1!r} ({time.time() - t0:.0f}s)", flush=True)
  headers = ["attribute", "method"] + list(METRICS)
  md = harness.markdown_table(headers, table)
  print(md)
  with open(os.path.join(args.out, "toy_world.md"), "w") as f:
    recorded = dict(vars(args), weights=os.path.relpath(args.weights, harness.REPO_ROOT))
    f.write(f"{machine}\n\n{recorded}\n\n{md}\n")


def _fmt(iv: dict) -> str:
  return f"{iv['mean']:.3f} [{iv['ci95_low']:.3f}, {iv['ci95_high']:.3f}]"


if __name__ == "__main__":
  main()
