r"""The paper's questions in the entangled toy world: does pure c1 change what the seed decided,
and does a learned lambda keep it better than the best hard switch?

  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error python benchmarks/toy_world.py \
      [--seeds 64] [--num_steps 50] [--t_stars 5,10,20,30] [--iterations 10] [--batch_seeds 8] [--beta B]

For every attribute (c0 = "a photo of a shape", which leaves shape, colour and position to the
seed; c1 = c0 + the attribute, configs/toy.py's open presets) and every seed, the same x_T and
noise are rendered under each method:

  c1          lambda = 1 at every step (pure target prompt)
  T*k         lambda = 0 for the first k of 50 steps, 1 after (the paper's hard switch)
  learned     lambda learned on that seed alone (Adam, the paper's objective with the toy CLIP
              and the world's perceptual VGG), from the preset's hard switch
  batch       one lambda learned on the first --batch_seeds seeds together, scored on the others
  transfer    the lambda learned on seed 0 alone, scored on seeds 1.. (held out)

and scored by the judge against the pure-c0 image of the seed: attribute success, content
preserved (shape, colour, position unchanged), combined (both), the centre's shift in pixels,
the relative size change, combined_strict (combined and the geometry kept within 1.5 px and
10%), plus directional CLIP (toy CLIP) and the VGG content distance; means with 95% intervals.
A second table answers, per attribute: how often pure c1 changes a seed-decided factor
(entanglement), which hard switch scores best on combined, and the paired difference
learned - best switch with its 95% interval. Writes toy_world.md, a figure per attribute
(rows seeds, columns methods) and the learned weights files (lambdas/<attribute>_seed0.json,
lambdas/<attribute>_batch.json: the transfer study's learned sources) into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from disentangle_jax import stats, weights_file  # noqa: E402
from disentangle_jax.toy import evaluate, judge, scenes, world  # noqa: E402

from configs import toy as toy_configs  # noqa: E402

METRICS = ("attribute_success", "content_preserved", "combined", "position_error_px",
           "size_error", "combined_strict", "directional_clip", "content_distance")


def render_columns(w, c0, c1, seeds, lams: dict, num_steps: int) -> dict:
  """{method: images [S, h, w, 3]} for lambda [T] or [T, S] per method (same x_T, noise)."""
  sd = w.sd
  emb = models.encode_prompts(sd, [c0, c1, ""])
  tables = schedule.step_tables(sd.schedule, num_steps)
  run = noise.draw(jax.random.key(0), np.asarray(seeds),
                   (sd.latent_size, sd.latent_size, sd.latent_channels), tables.sigma)
  render = evaluate.render_fn(sd.unet, sd.vae, sd.scaling_factor)
  prompts = pipeline.PromptPair(emb[0], emb[1], emb[2])
  out = {}
  for name, lam in lams.items():
    lam = np.asarray(lam, np.float32)
    lam = np.broadcast_to(lam[:, None], (num_steps, len(seeds))) if lam.ndim == 1 else lam
    out[name] = np.asarray(render(sd.params, run.x_T, run.noise, jnp.asarray(lam), prompts,
                                  evaluate.GUIDANCE, tables))
  return out


def learn(w, lm, c0, text, seeds, args, t_init: int, together: bool, out: str = ""):
  """Learned lambda [S, T] (one per seed) or [T] (one for all seeds), from a switch at t_init.
  ``out``: also write a weights file there (per seed: the first seed's lambda)."""
  common = dict(prompt=c0, attribute=text, t_star=t_init, remat=args.remat,
                sampling=sampling.SamplingConfig(num_steps=args.num_steps,
                                                 guidance=evaluate.GUIDANCE),
                loss=optimize.LossConfig(preprocess="standard", **(
                    {} if args.beta is None else {"beta": args.beta})),
                optimizer=optimize.OptimizerConfig(iterations=args.iterations))
  if together:
    spec = disentangle.EditSpec(seeds=tuple(seeds), **common)
  else:
    spec = disentangle.EditSet(tuple(disentangle.EditSpec(seeds=(s,), **common) for s in seeds))
  sd = w.sd
  prep = disentangle.prepare(sd, lm, spec, (sd.latent_size, sd.latent_size, sd.latent_channels),
                             parallel.make_mesh())
  lam, history, _ = disentangle.optimise(prep, spec, log=lambda m: None)
  if out:
    first, first_lam = (spec, lam) if together else (spec.specs[0], lam[0])
    if not together:
      history = disentangle.edit_history(history, 0, first.loss.beta)
    weights_file.write(out, weights_file.learned(
        first, sd.schedule, first_lam, history, model=os.path.relpath(
            os.path.join(args.weights, world.SD_DIR), harness.REPO_ROOT),
        optimizer=dataclasses.asdict(first.optimizer)))
  return lam


def score(w, lm, attribute: int, c0, c1, columns: dict) -> dict:
  """{method: {metric: [S] values}} against columns["original"]."""
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


def held_out(method: str, batch_seeds: int) -> slice:
  """The seeds a method is scored on: transfer and batch never on the seeds they learned on."""
  return {"transfer": slice(1, None), "batch": slice(batch_seeds, None)}.get(method, slice(None))


def answer(name: str, scores: dict, t_stars, batch_seeds: int) -> list[str]:
  """The paper's questions for one attribute: entanglement of pure c1, the best hard switch on
  combined, and learned - best switch (paired over seeds, 95% interval)."""
  changed = stats.interval(1 - scores["c1"]["content_preserved"])
  switches = {f"T*{t}": float(np.mean(scores[f"T*{t}"]["combined"])) for t in t_stars}
  best = max(switches, key=switches.get)
  row = [name, _fmt(changed), f"{best} ({switches[best]:.3f})"]
  if "learned" in scores:
    diff = stats.interval(scores["learned"]["combined"] - scores[best]["combined"])
    strict = stats.interval(scores["learned"]["combined_strict"]
                            - scores[best]["combined_strict"])
    row += [_fmt(stats.interval(scores["learned"]["combined"])), _fmt(diff), _fmt(strict),
            _verdict(diff)]
  return row


def _verdict(iv: dict) -> str:
  if iv["ci95_low"] > 0:
    return "learned better"
  if iv["ci95_high"] < 0:
    return "best switch better"
  return "no clear difference"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--weights", default=world.WEIGHTS_DIR)
  parser.add_argument("--seeds", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=50)
  parser.add_argument("--t_stars", default="5,10,20,30")
  parser.add_argument("--t_init", type=int, default=0,
                      help="hard-switch init of learning; 0 = the preset's T* (configs/toy.py)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--batch_seeds", type=int, default=8)
  parser.add_argument("--beta", type=float, default=None,
                      help="weight of the perceptual content loss in learning; default the "
                      "paper's (optimize.LossConfig)")
  parser.add_argument("--remat", default="full",
                      help="step remat of learning: 'full' (64 seeds without remat need ~12 "
                      "GiB), 'none' for a few seeds")
  parser.add_argument("--attributes", default=",".join(toy_configs.OPEN_PRESETS))
  parser.add_argument("--no_learn", action="store_true", help="switches and c1 only")
  parser.add_argument("--random_vgg", action="store_true",
                      help="learn with the random tiny VGG instead of the world's trained one")
  parser.add_argument("--figure_seeds", type=int, default=6)
  parser.add_argument("--out", default="benchmarks/toy_world")
  args = parser.parse_args()
  machine = harness.machine_report()
  print(machine)
  w = world.load(args.weights)
  lm = w.loss_models
  if args.random_vgg:
    lm = _random_vgg(args.weights, w)
  seeds = list(range(args.seeds))
  t_stars = [int(t) for t in args.t_stars.split(",")]
  os.makedirs(args.out, exist_ok=True)
  table, answers = [], []
  for name in args.attributes.split(","):
    t0 = time.time()
    c0, text, _, t_star, _ = toy_configs.PRESETS[name]
    c1 = c0 + text
    attribute = evaluate.attribute_index(c1)
    t_init = args.t_init or round(t_star * args.num_steps / 50)
    lams = {"original": np.zeros(args.num_steps), "c1": np.ones(args.num_steps)}
    lams.update({f"T*{t}": mixing.hard_switch(args.num_steps, round(t * args.num_steps / 50))
                 for t in t_stars})
    if not args.no_learn:
      files = os.path.join(args.out, "lambdas")
      os.makedirs(files, exist_ok=True)
      per_seed = learn(w, lm, c0, text, seeds, args, t_init, together=False,
                       out=os.path.join(files, f"{name}_seed0.json"))  # [S, T]
      lams["learned"] = per_seed.T
      lams["batch"] = learn(w, lm, c0, text, seeds[:args.batch_seeds], args, t_init,
                            together=True, out=os.path.join(files, f"{name}_batch.json"))
      lams["transfer"] = per_seed[0]
    columns = render_columns(w, c0, c1, seeds, lams, args.num_steps)
    scores = score(w, lm, attribute, c0, c1, columns)
    for method, ms in scores.items():
      sel = held_out(method, args.batch_seeds)
      table.append([name, method] + [_fmt(stats.interval(ms[k][sel])) for k in METRICS])
      print(" | ".join(table[-1]), flush=True)
    answers.append(answer(name, scores, t_stars, args.batch_seeds))
    print(" | ".join(answers[-1]), flush=True)
    rows = [[images.to_uint8(columns[m][i]) for m in columns] for i in range(args.figure_seeds)]
    images.grid(rows, list(columns), [str(s) for s in seeds[:args.figure_seeds]]).save(
        os.path.join(args.out, f"{name}.png"))
    print(f"{name}: {c0!r} -> {c1!r} ({time.time() - t0:.0f}s)", flush=True)
  md = harness.markdown_table(["attribute", "method"] + list(METRICS), table)
  headers = ["attribute", "pure c1 changes content", "best switch (combined)"]
  if not args.no_learn:
    headers += ["learned combined", "learned - best switch", "same, strict", "reading"]
  md_answers = harness.markdown_table(headers, answers)
  print(md)
  print(md_answers)
  with open(os.path.join(args.out, "toy_world.md"), "w") as f:
    recorded = dict(vars(args), weights=os.path.relpath(args.weights, harness.REPO_ROOT))
    f.write(f"{machine}\n\n{recorded}\n\n{md}\n\n{md_answers}\n")


def _random_vgg(root: str, w):
  """The world's loss networks with the random tiny VGG instead of its trained one."""
  cfg = dataclasses.replace(world.loss_model_config(root), vgg_path=None, vgg_input_size=None)
  return loss_models.load_loss_models(cfg, w.sd.tokenizer)


def _fmt(iv: dict) -> str:
  return f"{iv['mean']:.3f} [{iv['ci95_low']:.3f}, {iv['ci95_high']:.3f}]"


if __name__ == "__main__":
  main()
