"""The frozen loss networks: CLIP ViT-B/32 (image and text towers) and VGG16 up to relu4_3.

With ``models``, the only package that imports transformers. It builds the networks, loads
their weights from local files (it never downloads), builds tiny random versions for tests,
and returns pure apply functions; ``losses.py`` holds the loss math.

  config.py   LossModelConfig (where the weights come from), LossModels (what loading gives)
  loading.py  load_loss_models, encode_texts
  clip.py     CLIP: Hugging Face directories, the tiny CLIP, apply functions
  vgg.py      VGG16Features: torchvision weights, the tiny VGG, apply function
"""
from disentangle_jax.loss_models.clip import (clip_shapes, init_tiny_clip, load_clip,
                                              make_clip_image_fn, make_clip_text_fn,
                                              tiny_clip_config)
from disentangle_jax.loss_models.config import (TINY_CLIP_IMAGE_SIZE, TINY_CLIP_MAX_TOKENS,
                                                TINY_CLIP_PROJECTION,
                                                TINY_VGG_INPUT_SIZE, TINY_VGG_WIDTHS,
                                                VGG16_BLOCK_DEPTHS, VGG16_WIDTHS, VGG_TAP_NAMES,
                                                ClipTextApplyFn, LossModelConfig, LossModels)
from disentangle_jax.loss_models.loading import encode_texts, load_loss_models
from disentangle_jax.loss_models.vgg import (VGG16Features, init_tiny_vgg, load_vgg_params,
                                             make_vgg_fn, vgg_conv_layout,
                                             vgg_params_from_state_dict)
