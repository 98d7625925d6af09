"""Builds the toy world in a workdir: every training stage in order, then the exported files.

workdir/
  train_config.json   the TrainConfig of this workdir (another config is refused: no mixing)
  checkpoints/<stage>/  orbax checkpoints (a killed run resumes here)
  world/              the finished world (world.py's layout) with made.json
  losses.png          loss curves of every stage
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
from typing import Callable

import numpy as np
from transformers.models.clip import modeling_flax_clip

from disentangle_jax import models, plots
from disentangle_jax.toy import evaluate, perceptual, scenes, train, world
from disentangle_jax.toy import judge as judge_lib

CONFIG_FILE, WORLD_DIR = "train_config.json", "world"


def fingerprint(cfg: train.TrainConfig) -> str:
  blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_fingerprint(cfg: train.TrainConfig, name: str) -> str:
  """What a stage's checkpoint depends on: the data, the VAE (every stage uses its latents or
  reconstructions), the stage's own settings and the sizes of the networks it trains. A
  finished stage is reused by a config that changes only other stages (e.g. the UNet's width
  retrains the diffusion stage alone)."""
  c = dataclasses.asdict(cfg)
  deps = {k: c[k] for k in ("seed", "dataset_size", "kl_weight", "vae")}
  if name in ("clip", "diffusion"):  # trained on partial captions
    deps["omit_prob"] = cfg.omit_prob
  deps["sizes"] = {k: v for k, v in c["sizes"].items()
                   if k.startswith(("vae_",) + _STAGE_SIZES.get(name, ()))}
  deps["stage"] = dataclasses.asdict(cfg.stage(name))
  if name == "judge":
    deps["judge"] = c["judge"]
  if name == "perceptual":
    deps["perceptual_net"] = c["perceptual_net"]
  if name == "diffusion":  # its text encoder is the trained CLIP's text tower
    deps["uncond_prob"] = cfg.uncond_prob
    deps["clip"] = stage_fingerprint(cfg, "clip")
  blob = json.dumps(deps, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Prefixes of the world.Sizes fields each stage's networks are built from (besides the VAE's).
_STAGE_SIZES = {"clip": ("clip_",), "diffusion": ("unet_",)}


def clip_text_params(clip_params) -> dict:
  """The FlaxCLIPTextModel parameters of a FlaxCLIPModel's text tower (same config)."""
  return {"text_model": clip_params["text_model"]}


def claim_workdir(cfg: train.TrainConfig, workdir: str) -> bool:
  """Records cfg in workdir, or checks it equals the recorded one. True if already built."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  mine = {"fingerprint": fingerprint(cfg), "config": dataclasses.asdict(cfg)}
  if path.is_file():
    try:
      theirs = json.loads(path.read_text())
    except json.JSONDecodeError:
      theirs = {}
    if theirs.get("fingerprint") != mine["fingerprint"]:
      raise ValueError(f"workdir {workdir} holds a toy-world run with another training config "
                       f"({path}); resume it with the same config or use a new --workdir.")
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mine, indent=2))
    os.replace(tmp, path)
  return (pathlib.Path(workdir) / WORLD_DIR / world.MADE_FILE).is_file()


def recorded_command(module: str, argv) -> str:
  """``python -m module *argv`` for made.json, naming no folder of this machine: the workdir
  is the user's choice (``--workdir=DIR`` and ``--workdir DIR`` both become WORKDIR)."""
  args = ["WORKDIR" if i and argv[i - 1] in ("--workdir", "-workdir") else
          re.sub(r"^(--?workdir)=.*", r"\1=WORKDIR", a) for i, a in enumerate(argv)]
  return " ".join(["python -m", module] + args)


def build(cfg: train.TrainConfig, workdir: str, log: Callable, provenance: dict) -> dict:
  """Trains (or resumes) every stage and writes workdir/world. Returns made.json's content."""
  if claim_workdir(cfg, workdir):
    log(f"{workdir}/{WORLD_DIR} is complete; nothing to do.")
    return world.read_made(os.path.join(workdir, WORLD_DIR))
  fp, t_start = fingerprint(cfg), time.time()
  ckpt = functools.partial(os.path.join, os.path.abspath(workdir), "checkpoints")
  size = cfg.judge.image_size
  tok = world.tokenizer()
  sd = world.build_sd(cfg.sizes, size, 1.0, None, tok)
  clip_config = world.clip_config(cfg.sizes, tok, size)
  clip_module = modeling_flax_clip.FlaxCLIPModule(clip_config)
  params = train.init_params(cfg, sd, clip_module)
  log(f"rendering {cfg.dataset_size} training scenes")
  data = train.make_data(cfg)
  seconds, histories = {}, {}

  def stage(name, loss_fn, p, make_batch):
    p, histories[name], seconds[name] = train.run_stage(
        name, cfg, loss_fn, p, make_batch, ckpt(name), stage_fingerprint(cfg, name), log)
    return p

  vae_p = stage("vae", functools.partial(train.vae_loss, sd.vae, cfg.kl_weight), params["vae"],
                train.vae_batches(data, cfg))
  latents = train.encode_all(sd.vae, vae_p, data.images)
  scale = train.latent_scale(latents)
  recon = train.decode_all(sd.vae, vae_p, latents)
  log(f"latent scale {scale:.4f}; reconstruction MSE "
      f"{np.mean((recon / 255.0 - data.images / 255.0) ** 2):.5f}")

  judge_batches = train.mixed_batches(data.images, recon, data, cfg, "judge")
  judge_p = stage("judge", functools.partial(train.judge_loss, cfg.judge), params["judge"],
                  lambda k: dict(zip(("images", "factors", "geometry"), judge_batches(k))))

  log(f"rendering {cfg.dataset_size} scenes of the perceptual network's own stream")
  own = train.make_data(cfg, perceptual.DATA_STREAM, perceptual.SEED_OFFSET)
  own_recon = train.decode_all(sd.vae, vae_p, train.encode_all(sd.vae, vae_p, own.images))
  perceptual_batches = train.mixed_batches(own.images, own_recon, own._replace(
      factors=scenes.scene_index(own.factors)), cfg, "perceptual")  # "factors": class labels
  perceptual_p = stage("perceptual", functools.partial(train.perceptual_loss, cfg.perceptual_net),
                       params["perceptual"],
                       lambda k: dict(zip(("images", "labels"), perceptual_batches(k)[:2])))

  all_ids = world.caption_ids(tok, scenes.all_captions())
  clip_batches = train.mixed_batches(data.images, recon, data, cfg, "clip")

  def clip_batch(k):
    imgs, factors, _ = clip_batches(k)
    captions = train.batch_captions(cfg, "clip", k, factors)
    return {"pixels": train.clip_pixels(imgs), "all_ids": all_ids,
            "labels": scenes.caption_index(captions),
            "positives": scenes.consistent(captions, factors).astype(np.float32)}
  clip_p = stage("clip", functools.partial(train.clip_loss, clip_module), params["clip"],
                 clip_batch)

  text_p = clip_text_params(clip_p)
  emb_table = np.asarray(models.encode_prompts(
      sd._replace(params={"text_encoder": text_p}),
      scenes.all_captions() + [""]))  # [301, tokens, width]: the frozen text encoder's output
  scaled = (latents * scale).astype(np.float32)

  def diffusion_batch(k):
    rng = np.random.default_rng([cfg.seed, train.STAGES.index("diffusion"), k])
    idx = rng.integers(0, len(scaled), cfg.diffusion.batch)
    labels = scenes.caption_index(train.batch_captions(cfg, "diffusion", k, data.factors[idx]))
    rows = np.where(rng.random(len(idx)) < cfg.uncond_prob, len(emb_table) - 1, labels)
    return {"latents": scaled[idx], "emb": emb_table[rows]}
  unet_p = stage("diffusion", functools.partial(train.diffusion_loss, sd.unet,
                                                train.schedule_alphas()),
                 params["unet"], diffusion_batch)

  final_sd = world.build_sd(cfg.sizes, size, scale, {"unet": unet_p, "vae": vae_p,
                                                     "text_encoder": text_p}, tok)
  made = dict(provenance, seed=cfg.seed, fingerprint=fp, train_seconds=seconds,
              this_process_seconds=round(time.time() - t_start, 1),
              final_losses={k: h[-1][1] for k, h in histories.items()},
              loss_history=histories,  # [[step, mean loss], ...] every log_every steps
              latent_scale=scale, config=dataclasses.asdict(cfg))
  out = pathlib.Path(workdir) / WORLD_DIR
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  models.save(final_sd, tmp / world.SD_DIR)
  world.save_clip(tmp / world.CLIP_DIR, clip_config, clip_p)
  judge_lib.save(tmp / world.JUDGE_DIR, cfg.judge, judge_p)
  perceptual.save(tmp / world.VGG_DIR, perceptual_p)
  loaded = world.load(str(tmp))
  made["quality"] = evaluate.quality(loaded, cfg.seed + 1, log=log)
  (tmp / world.MADE_FILE).write_text(json.dumps(made, indent=2) + "\n")
  if plots.available():
    (pathlib.Path(workdir) / "losses.png").write_bytes(plots.curves_plot(histories))
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  log(f"wrote {out} in {made['this_process_seconds']}s; final losses {made['final_losses']}")
  return made
