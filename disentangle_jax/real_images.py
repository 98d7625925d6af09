"""Reading a user's image file safely, fitting it to the model, and a synthetic test image.

``load`` refuses, with a message naming the file and the fix: a missing file, a file PIL cannot
identify, a float image holding NaN or inf, an image smaller than MIN_IMAGE_SIDE or larger than MAX_IMAGE_SIDE px on a side (the
size is read from the header, BEFORE any pixel is decoded, which also stops decompression
bombs) and a truncated file (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False, so a cut
file raises instead of being padded with grey). ``fit`` then resizes the shorter side and
centre-crops to the model's square size. Host-side numpy + PIL; nothing here is traced.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

MIN_IMAGE_SIDE = 8  # px; smaller images carry no content worth editing
MAX_IMAGE_SIDE = 8192  # px; larger images are refused before decoding
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # decompression-bomb guard (width x height)
RESAMPLE = Image.Resampling.LANCZOS  # filter of the shorter-side resize
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


class LoadedImage(NamedTuple):
  """pixels: uint8 [h, w, 3] RGB; mode: the file's PIL mode; notes: what was converted."""

  pixels: np.ndarray
  mode: str
  notes: tuple[str, ...]


def load(path: str) -> LoadedImage:
  """Reads and validates an image file (any PIL-readable format) as RGB uint8 [h, w, 3].

  Greyscale, palette, CMYK, 16-bit and transparent images are converted to RGB (transparency
  composited onto white); the EXIF orientation is applied. Raises FileNotFoundError or
  ValueError naming ``path``.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise ValueError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated "
                     "image files cannot be detected: leave it False.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"image {path!r} does not exist: pass an existing image file.")
  if not os.path.isfile(path):
    raise ValueError(f"image {path!r} is not a file: pass an image file (PNG, JPEG, ...).")
  notes = []
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      with Image.open(path) as im:
        _check_size(path, im.size)  # from the header; no pixel is decoded yet
        im.load()
        _check_finite(path, im)
        mode = im.mode
        rgb = _to_rgb(im, notes)
    except Image.UnidentifiedImageError:
      raise ValueError(f"image {path!r} is not an image file PIL can read (PNG, JPEG, WebP, "
                       "BMP, TIFF, GIF, ...): pass an image.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise ValueError(f"image {path!r} is too large to decode safely ({e}): downscale it "
                       f"below {MAX_IMAGE_SIDE} px per side.") from None
    except (OSError, SyntaxError, EOFError) as e:  # PIL's truncation / corrupt-data errors
      if isinstance(e, (FileNotFoundError, PermissionError)):
        raise
      raise ValueError(f"image {path!r} is truncated or corrupt ({e}): re-export or re-download "
                       "the file.") from None
  return LoadedImage(pixels=np.asarray(rgb, np.uint8), mode=mode, notes=tuple(notes))


def _check_size(path: str, size: tuple[int, int]) -> None:
  w, h = size
  if min(w, h) < MIN_IMAGE_SIDE:
    raise ValueError(f"image {path!r} is {w}x{h} px, smaller than the minimum of "
                     f"{MIN_IMAGE_SIDE} px per side: pass a larger image.")
  if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
    raise ValueError(f"image {path!r} is {w}x{h} px, larger than the maximum of "
                     f"{MAX_IMAGE_SIDE} px per side: downscale it first (it was not decoded).")


def _check_finite(path: str, im: Image.Image) -> None:
  """A float image (a 32-bit TIFF, mode F) holding NaN or inf would otherwise become a flat
  black picture without a word."""
  if im.mode == "F" and not np.all(np.isfinite(np.asarray(im))):
    raise ValueError(f"image {path!r} holds non-finite pixel values (NaN or inf): re-export it "
                     "with finite values (or as an 8-bit PNG).")


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
  if getattr(im, "n_frames", 1) > 1:
    notes.append(f"{im.n_frames} frames: the first is used")
  oriented = ImageOps.exif_transpose(im)
  if oriented is not None and oriented.size != im.size:
    notes.append("rotated by its EXIF orientation")
  im = oriented if oriented is not None else im
  if im.mode == "RGB":
    return im.copy()
  transparent = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
  if transparent:
    notes.append(f"mode {im.mode} with transparency composited onto white")
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
  notes.append(f"mode {im.mode} converted to RGB")
  if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # high bit depth: scale to 8 bits
    a = np.asarray(im, np.float64)
    peak = 65535.0 if im.mode.startswith("I") else max(float(a.max()), 1.0)
    im = Image.fromarray(np.round(np.clip(a / peak, 0, 1) * 255).astype(np.uint8), "L")
  return im.convert("RGB")


def fit(pixels: np.ndarray, size: int) -> tuple[np.ndarray, str | None]:
  """Resizes the shorter side to ``size`` and centre-crops to ``size`` x ``size``.

  Args:
    pixels: uint8 [h, w, 3].
    size: the model's image side in px.

  Returns:
    (float32 [size, size, 3] in [0, 1], a note describing the change or None if none was needed).
  """
  h, w = pixels.shape[:2]
  if (h, w) == (size, size):
    return pixels.astype(np.float32) / 255.0, None
  scale = size / min(h, w)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  im = Image.fromarray(pixels).resize((new_w, new_h), RESAMPLE)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  im = im.crop((left, top, left + size, top + size))
  note = f"resized {w}x{h} -> {new_w}x{new_h} and centre-cropped to {size}x{size} px"
  return np.asarray(im, np.float32) / 255.0, note


def synthetic(size: int) -> np.ndarray:
  """A deterministic test picture (sky, ground, a building with a roof and a door).

  Stands in for a photo when no image file is given (the tiny demo and the tests).

  Returns:
    float32 [size, size, 3] in [0, 1].
  """
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
  img = np.empty((size, size, 3), np.float32)
  img[...] = np.stack([0.45 + 0.3 * y, 0.6 + 0.25 * y, 0.95 - 0.1 * y], -1)  # sky gradient
  ground = y > 0.75
  img[ground] = [0.35, 0.55, 0.25]
  body = (np.abs(x - 0.5) < 0.2) & (y > 0.4) & (y <= 0.8)
  img[body] = [0.8, 0.75, 0.65]
  roof = (y > 0.15) & (y <= 0.4) & (np.abs(x - 0.5) < (y - 0.15) * 0.9)
  img[roof] = [0.55, 0.2, 0.15]
  door = (np.abs(x - 0.5) < 0.05) & (y > 0.62) & (y <= 0.8)
  img[door] = [0.3, 0.2, 0.1]
  return img


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_files(folder: str) -> tuple[str, ...]:
  """The image files of ``folder`` (sorted; other files are ignored)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"images_dir {folder!r} is not a folder: give a folder of images.")
  files = tuple(os.path.join(folder, n) for n in sorted(os.listdir(folder))
                if n.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ValueError(f"images_dir {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
  return files
