r"""How classifier-free guidance spreads what "a photo of a shape" leaves to the seed.

  python benchmarks/toy_spread.py [--seeds 96] [--first_seed 6000] [--guidance 1.5,3,4.5,7.5]

Samples the open caption (every content factor unnamed, no attribute) of the shipped toy world
with DDIM 50 at each guidance scale, on the same seeds, reads each sample with the world's judge
and prints how many samples show each shape, colour and position, and the issue's spread measure
(the rarest value's frequency as a fraction of its fair share; the floor is 0.5). The README's
table under "What the shipped toy world reaches" is this script's output.
"""
import argparse

import numpy as np

import harness

harness.add_repo_to_path()
harness.quiet_libraries()

from disentangle_jax.toy import evaluate, scenes, world  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=96)
  parser.add_argument("--first_seed", type=int, default=6000)
  parser.add_argument("--guidance", default="1.5,3,4.5,7.5")
  parser.add_argument("--num_steps", type=int, default=evaluate.NUM_STEPS)
  args = parser.parse_args()
  w = world.load()
  caps = np.full((args.seeds, 4), scenes.OMITTED, np.int32)
  caps[:, 3] = 0  # no attribute
  seeds = np.arange(args.seeds) + args.first_seed
  headers = ["CFG"] + [" / ".join(v) for v in (scenes.SHAPES, scenes.COLOURS, scenes.POSITIONS)]
  headers += ["spread shape / colour / position"]
  rows = []
  for g in (float(x) for x in args.guidance.split(",")):
    pred = evaluate.judge_predict(w, evaluate.sample(w, caps, seeds, args.num_steps, g))[0]
    counts = [np.bincount(pred[:, k], minlength=scenes.FACTOR_SIZES[k])
              for k in range(scenes.CONTENT_FACTORS)]
    spread = [c.min() / args.seeds * len(c) for c in counts]
    rows.append([g] + [" / ".join(str(int(v)) for v in c) for c in counts]
                + [" / ".join(f"{s:.2f}" for s in spread)])
    print(f"CFG {g}: {rows[-1][1:]}", flush=True)
  print(harness.machine_report())
  print(f"seeds {seeds[0]}..{seeds[-1]}, DDIM {args.num_steps}")
  print(harness.markdown_table(headers, rows))


if __name__ == "__main__":
  main()
