"""Small PNG plots of a run (matplotlib, optional: without it plots are skipped with a note)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def available() -> bool:
  try:
    import matplotlib  # noqa: F401,PLC0415
  except ImportError:
    return False
  return True


def _figure():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415
  return plt, plt.subplots(figsize=(6, 3.2), dpi=100)


def _png(plt, fig) -> bytes:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()


def lambda_plot(initial: Sequence[float], learned: Sequence[float]) -> bytes:
  """lambda per sampling step (0 = noisiest), initial vs learned. Returns PNG bytes."""
  plt, (fig, ax) = _figure()
  steps = np.arange(len(initial))
  ax.step(steps, initial, where="mid", label="initial (hard switch)", color="0.6")
  ax.plot(steps, learned, marker=".", label="learned")
  ax.axhline(0, color="0.85", lw=0.8)
  ax.axhline(1, color="0.85", lw=0.8)
  ax.set_xlabel("sampling step (0 = noisiest)")
  ax.set_ylabel("lambda (weight on target prompt)")
  ax.set_title("mixing weight per sampling step", fontsize=10)
  ax.legend(loc="best", fontsize=8)
  return _png(plt, fig)


def loss_plot(history: Sequence[dict], beta: float) -> bytes:
  """Loss components per iteration. Returns PNG bytes."""
  plt, (fig, ax) = _figure()
  it = [h["iteration"] for h in history]
  ax.plot(it, [h["loss"] for h in history], marker="o", label="loss")
  ax.plot(it, [h["l_dir"] for h in history], marker=".", label="L_dir")
  ax.plot(it, [beta * h["l_perc"] for h in history], marker=".", label=f"{beta} x L_perc")
  ax.set_xlabel("iteration (loss of the lambda before that iteration's update)")
  ax.set_ylabel("loss (summed over edits)")
  ax.set_title(f"loss = L_dir + {beta} x L_perc", fontsize=10)
  ax.legend(loc="best", fontsize=8)
  return _png(plt, fig)


def study_plot(summary: Sequence[dict], metric_names: Sequence[str]) -> bytes:
  """One panel per metric: each source's mean over all items with its 95% interval.

  ``summary`` holds ``stats.summarise`` records; only those with attribute "all" are drawn.
  Returns PNG bytes.
  """
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415
  recs = [r for r in summary if r["attribute"] == "all"]
  sources = list(dict.fromkeys(r["source"] for r in recs))
  fig, axes = plt.subplots(1, len(metric_names), figsize=(3.2 * len(metric_names), 3.2), dpi=100,
                           squeeze=False)
  for ax, name in zip(axes[0], metric_names):
    mine = {r["source"]: r for r in recs if r["metric"] == name}
    means = [mine[s]["mean"] for s in sources]
    err = [[mine[s]["mean"] - mine[s]["ci95_low"] for s in sources],
           [mine[s]["ci95_high"] - mine[s]["mean"] for s in sources]]
    ax.bar(np.arange(len(sources)), means, yerr=err, capsize=3, color="C0")
    ax.set_xticks(np.arange(len(sources)))
    ax.set_xticklabels(sources, rotation=45, ha="right", fontsize=8)
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("mean over items", fontsize=8)
  fig.suptitle("each source over all attributes and seeds; error bars: 95% interval of the mean "
               "(mean +- 1.96 std / sqrt(n))", fontsize=8)
  return _png(plt, fig)


def source_attribute_plot(summary: Sequence[dict], metric: str) -> bytes:
  """How each source generalises across attributes: a heatmap of ``metric``'s mean (over
  seeds) per source (rows) and attribute (columns), each cell labelled with its mean and the
  half width of its 95% interval. ``summary`` holds ``stats.summarise`` records. PNG bytes."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415
  recs = [r for r in summary if r["metric"] == metric]
  sources = list(dict.fromkeys(r["source"] for r in recs))
  attributes = list(dict.fromkeys(r["attribute"] for r in recs))
  cell = {(r["source"], r["attribute"]): r for r in recs}
  means = np.array([[cell[s, a]["mean"] for a in attributes] for s in sources])
  fig, ax = plt.subplots(figsize=(1.3 * len(attributes) + 2.5, 0.45 * len(sources) + 1.5),
                         dpi=100)
  im = ax.imshow(means, cmap="viridis", aspect="auto")
  for i, s in enumerate(sources):
    for j, a in enumerate(attributes):
      half = cell[s, a]["ci95_high"] - cell[s, a]["mean"]
      ax.text(j, i, f"{means[i, j]:.2f}\n+-{half:.2f}", ha="center", va="center", fontsize=7,
              color="w" if means[i, j] < means.mean() else "k")
  ax.set_xticks(np.arange(len(attributes)))
  ax.set_xticklabels(attributes, fontsize=8)
  ax.set_yticks(np.arange(len(sources)))
  ax.set_yticklabels(sources, fontsize=8)
  ax.set_title(f"{metric}: mean over seeds (+- 95% half width)", fontsize=9)
  fig.colorbar(im, ax=ax)
  return _png(plt, fig)


def curves_plot(histories: dict) -> bytes:
  """One panel per named curve {name: [[step, value], ...]} (log scale). Returns PNG bytes."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415
  names = list(histories)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), dpi=100,
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    h = np.asarray(histories[name], np.float64).reshape(-1, 2)
    ax.plot(h[:, 0], h[:, 1])
    ax.set_yscale("log")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
  return _png(plt, fig)
