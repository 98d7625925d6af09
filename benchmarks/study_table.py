r"""A finished study's summary as a markdown table: sources x attributes, one metric.

  python benchmarks/study_table.py WORKDIR [--metric combined] [--metric content_preserved]

Reads WORKDIR/summary.csv (written by `launch.study`) and prints, per metric, one row per source
(in the study's order) and one column per attribute plus "all": the mean over seeds and its 95%
interval. The README's table of the toy world's generalisation study is this script's output.
"""
import argparse
import csv
import os

import harness


def table(records: list[dict], metric: str) -> str:
  sources = list(dict.fromkeys(r["source"] for r in records))
  groups = list(dict.fromkeys(r["attribute"] for r in records))
  groups = [g for g in groups if g != "all"] + ["all"]
  cell = {(r["source"], r["attribute"]): r for r in records if r["metric"] == metric}
  if not cell:
    raise SystemExit(f"error: no metric {metric!r} in the summary; it has "
                     f"{sorted({r['metric'] for r in records})}")
  rows = []
  for s in sources:
    row = [s]
    for g in groups:
      r = cell[(s, g)]
      row.append(f"{float(r['mean']):.3f} [{float(r['ci95_low']):.3f}, "
                 f"{float(r['ci95_high']):.3f}]")
    rows.append(row)
  return harness.markdown_table(["source \\ attribute"] + groups, rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--metric", action="append", default=None)
  args = parser.parse_args()
  path = os.path.join(args.workdir, "summary.csv")
  if not os.path.exists(path):
    raise SystemExit(f"error: {path} does not exist; run launch.study into {args.workdir} first")
  with open(path) as f:
    records = list(csv.DictReader(f))
  n = {r["n"] for r in records if r["attribute"] != "all"}
  print(f"{path}: {len({r['source'] for r in records})} sources, seeds per cell {sorted(n)}")
  for metric in args.metric or ["combined"]:
    print(f"\n{metric} (mean over seeds [95% interval])\n")
    print(table(records, metric))


if __name__ == "__main__":
  main()
