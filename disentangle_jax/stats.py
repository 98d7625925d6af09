"""Summary statistics of the study's rows: mean, spread and a 95% interval per source."""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import numpy as np


# Two-sided 95% normal quantile, for the interval mean +- Z_95 * std / sqrt(n).
Z_95 = 1.959963984540054


def interval(values: Sequence[float]) -> dict[str, float]:
  """n, mean, std (ddof 1; 0 for one value) and the 95% normal interval of the mean."""
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(np.mean(x))
  std = float(np.std(x, ddof=1)) if n > 1 else 0.0
  half = Z_95 * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def summarise(rows: Sequence[dict], spec) -> list[dict[str, Any]]:
  """One record per (source, attribute or "all", metric), sources in spec order."""
  out = []
  for src in spec.sources:
    mine = [r for r in rows if r["source"] == src.label]
    for group in ["all"] + [a.name for a in spec.attributes]:
      sel = mine if group == "all" else [r for r in mine if r["attribute"] == group]
      for name in spec.metric_names:
        out.append({"source": src.label, "attribute": group, "metric": name,
                    **interval([r[name] for r in sel])})
  return out


SUMMARY_COLUMNS = ("source", "attribute", "metric", "n", "mean", "std", "ci95_low", "ci95_high")


def summary_csv(summary: Sequence[dict]) -> str:
  """CSV text of ``summarise`` records (floats written in full precision)."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(SUMMARY_COLUMNS)
  for rec in summary:
    writer.writerow([repr(rec[c]) if isinstance(rec[c], float) else rec[c]
                     for c in SUMMARY_COLUMNS])
  return buf.getvalue()
