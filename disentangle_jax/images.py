"""Image conversion and grids (host-side numpy + PIL; nothing here is traced)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw  # noqa: F401  (Image is re-exported)

# Pixels between grid cells and the height of the column-label band.
GRID_PAD = 2
LABEL_HEIGHT = 14
# Grid cells are enlarged (whole factors, nearest neighbour) to at least this many px.
MIN_CELL = 128


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] ([..., H, W, 3]) to uint8, rounding like PIL/torchvision."""
  x = np.asarray(images, dtype=np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or Inf: the sampler diverged (check guidance/lambda).")
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str] | None = None,
         row_labels: Sequence[str] | None = None, min_cell: int = MIN_CELL) -> Image.Image:
  """Tiles uint8 images [h, w, 3] (rows x columns, all the same size) into one PIL image.

  Cells smaller than ``min_cell`` px are enlarged by a whole factor (nearest neighbour: every
  model pixel stays visible as a block) so small models' images and the labels stay legible.
  """
  if len(rows) == 0 or len(rows[0]) == 0:
    raise ValueError("grid needs at least one image.")
  h0, w0 = rows[0][0].shape[:2]
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      if img.shape[:2] != (h0, w0):
        raise ValueError(f"grid image ({i}, {j}) has size {img.shape[:2]}, expected {(h0, w0)}.")
  factor = max(1, -(-min_cell // max(h0, w0)))
  rows = [[np.repeat(np.repeat(img, factor, axis=0), factor, axis=1) for img in row]
          for row in rows]
  h, w = rows[0][0].shape[:2]
  n_rows, n_cols = len(rows), max(len(r) for r in rows)
  top = LABEL_HEIGHT if column_labels else 0
  left = 6 * max((len(s) for s in row_labels), default=0) + 4 if row_labels else 0
  canvas = Image.new("RGB", (left + n_cols * (w + GRID_PAD) + GRID_PAD,
                             top + n_rows * (h + GRID_PAD) + GRID_PAD), "white")
  draw = ImageDraw.Draw(canvas)
  for j, label in enumerate(column_labels or []):
    draw.text((left + GRID_PAD + j * (w + GRID_PAD), 1), label, fill="black")
  for i, row in enumerate(rows):
    y = top + GRID_PAD + i * (h + GRID_PAD)
    if row_labels:
      draw.text((2, y + h // 2 - 5), row_labels[i], fill="black")
    for j, img in enumerate(row):
      if img.shape[:2] != (h, w):
        raise ValueError(f"grid image ({i}, {j}) has size {img.shape[:2]}, expected {(h, w)}.")
      canvas.paste(Image.fromarray(img), (left + GRID_PAD + j * (w + GRID_PAD), y))
  return canvas


def load_png(path: str) -> np.ndarray:
  """uint8 [h, w, 3] of an RGB image file."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def png_bytes(pixels: np.ndarray) -> bytes:
  """The PNG file of uint8 pixels [h, w, 3]."""
  import io  # noqa: PLC0415
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()
