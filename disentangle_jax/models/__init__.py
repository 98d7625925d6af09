"""Stable Diffusion for this library: what a model is, how its files are read, tiny stand-ins.

The only package that imports diffusers and transformers (with ``loss_models``). It returns the
Flax modules (static objects) and their weights as one params pytree, and wraps the modules as
functions that take the weights as an argument, so jitted code never captures weights.

  config.py       ModelConfig: which model, and how to run it (dtype, attention, conv, remat)
  family.py       SD 1.x / 2.x / SDXL: what differs, detection, refusal of other families
  bundle.py       StableDiffusion: the loaded modules + params + constants; prompts -> embeddings
  apply.py        pure wrappers eps_fn / decode / encode / text_fn, and the run options
  build.py        Flax modules from config dicts, their parameter shapes
  loading.py      ``load``: folder, single file, or the tiny model
  folder.py       diffusers-layout folders: read, ``save``
  single_file.py  CompVis/LDM single files (``ldm_keys.py``: their key names and configs)
  tiny.py         the tiny random model (tests, smoke runs)
  flow_bundle.py  SD 3.x / Flux.1 (flow_folder.py's FlowModel) in the same bundle: the flow
                  sampler as the predictor, the shifted VAE, CLIP + T5 prompts
  flow_tiny.py    tiny random SD 3.5 / Flux.1 built in code (model.tiny_family sd3 / flux)

Weights come from local files only; nothing is ever downloaded. ``path=None`` builds the tiny
random model with the same structure.
"""
from disentangle_jax.models.apply import (decoder, make_decode_fn, make_encode_fn, make_eps_fn,
                                          make_hidden_fn, make_text_fn, predictor, run_options,
                                          weights_record)
from disentangle_jax.models.build import (build_text_encoder, build_unet, build_vae,
                                          shape_trees, to_device, vae_scale_factor)
from disentangle_jax.models.bundle import (StableDiffusion, check_pairs, encode_prompts,
                                           encode_with_negative, tokenize, unknown_words)
from disentangle_jax.models.config import ATTENTIONS, CONVS, DTYPES, ModelConfig, compute_dtype
from disentangle_jax.models.family import FAMILIES, Family
from disentangle_jax.models.folder import save
from disentangle_jax.models.loading import load
from disentangle_jax.models.tiny import (build_tiny, tiny_folder_configs, tiny_text_config,
                                         tiny_unet_config, tiny_vae_config, write_tiny_tokenizer)

__all__ = [
    "ATTENTIONS", "CONVS", "DTYPES", "FAMILIES", "Family", "ModelConfig", "StableDiffusion",
    "build_text_encoder", "build_tiny", "build_unet", "build_vae", "check_pairs",
    "compute_dtype", "decoder", "encode_prompts", "encode_with_negative", "load",
    "make_decode_fn", "make_encode_fn", "make_eps_fn", "make_hidden_fn", "make_text_fn",
    "predictor", "run_options", "save", "shape_trees", "tiny_folder_configs", "tiny_text_config",
    "tiny_unet_config", "tiny_vae_config", "to_device", "tokenize", "unknown_words",
    "vae_scale_factor", "weights_record", "write_tiny_tokenizer",
]
