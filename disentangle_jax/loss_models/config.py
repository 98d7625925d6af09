"""Where the loss networks come from (``LossModelConfig``) and what loading them gives (``LossModels``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from disentangle_jax import losses

Params = Any

# torchvision vgg16().features up to relu4_3: conv widths and 3x3 convs per block; the block
# outputs relu1_2, relu2_2, relu3_3, relu4_3 are the perceptual-loss taps.
VGG16_WIDTHS = (64, 128, 256, 512)
VGG16_BLOCK_DEPTHS = (2, 2, 3, 3)
VGG_TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
_VGG_KERNEL = 3  # 3x3 convolutions, stride 1, padding 1
_VGG_POOL = 2  # 2x2 max pooling, stride 2, between blocks

# Tiny random VGG (tests, demos): same layers and taps, few channels, small input.
TINY_VGG_WIDTHS = (4, 8, 16, 32)
TINY_VGG_INPUT_SIZE = 32

# Tiny random CLIP (tests, demos). Image size 28 = 64 * 7 / 16, so a 64 x 64 test image goes
# through the reference code's exact nearest x7 / average-pool 16 preprocessing.
TINY_CLIP_IMAGE_SIZE = 28
TINY_CLIP_PATCH_SIZE = 7
TINY_CLIP_HIDDEN = 32
TINY_CLIP_INTERMEDIATE = 64
TINY_CLIP_LAYERS = 2
TINY_CLIP_HEADS = 4
TINY_CLIP_PROJECTION = 16
TINY_CLIP_MAX_TOKENS = 77  # CLIP's context length, so SD tokenizers fit unchanged

ClipTextApplyFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossModelConfig:
  """Where the loss networks come from (None = the tiny random version)."""

  clip_path: str | None = None  # Hugging Face CLIP directory; None = tiny random CLIP
  vgg_path: str | None = None  # torchvision VGG16 .safetensors (.pth with allow_pickle)
  allow_pickle: bool = False  # permit loading a pickled .pth VGG checkpoint (runs code!)
  tiny_seed: int = 0  # seed of the tiny random networks
  vgg_input_size: int | None = None  # VGG resize; None: 224 (real) / 32 (tiny)
  tiny_vgg_widths: tuple[int, ...] = TINY_VGG_WIDTHS  # channels of the tiny VGG's 4 blocks

  def __post_init__(self):
    if len(self.tiny_vgg_widths) != len(VGG16_WIDTHS) or min(self.tiny_vgg_widths) < 1:
      raise ValueError(
          f"loss_models.tiny_vgg_widths={self.tiny_vgg_widths} must be "
          f"{len(VGG16_WIDTHS)} positive channel counts, e.g. {TINY_VGG_WIDTHS}.")
    min_size = _VGG_POOL**(len(VGG16_WIDTHS) - 1)
    if self.vgg_input_size is not None and self.vgg_input_size < min_size:
      raise ValueError(
          f"loss_models.vgg_input_size={self.vgg_input_size} is too small: VGG pools "
          f"{len(VGG16_WIDTHS) - 1} times, so use at least {min_size} (224 for real VGG16).")


class LossModels(NamedTuple):
  """The loss networks as pure functions plus their parameters.

  Attributes:
    clip_image_apply: (params["clip"], pixels [B, S, S, 3] preprocessed) -> [B, E].
    clip_text_apply: (params["clip"], input_ids [N, L], attention_mask [N, L]) -> [N, E].
    vgg_apply: (params["vgg"], x [B, R, R, 3] normalised) -> 4 activations [B, h, w, c].
    params: {"clip": ..., "vgg": ...}; pass them to jitted code as arguments.
    clip_image_size: S, the CLIP vision tower's input size.
    clip_max_tokens: L, the CLIP text tower's context length.
    vgg_input_size: R, the side of the resize before VGG.
    tokenizer: a Hugging Face-style tokenizer whose ids the CLIP text tower accepts.
  """

  clip_image_apply: losses.ClipApplyFn
  clip_text_apply: ClipTextApplyFn
  vgg_apply: losses.VggApplyFn
  params: dict
  clip_image_size: int
  clip_max_tokens: int
  vgg_input_size: int
  tokenizer: Any
