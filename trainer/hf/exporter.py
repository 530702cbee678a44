"""`capjax export-hf`: a capjax checkpoint as a Hugging Face folder that
`VisionEncoderDecoderModel.from_pretrained` loads (a BLIP decoder's:
`BlipForConditionalGeneration` and `BlipProcessor`): config.json,
model.safetensors, tokenizer files, preprocessor_config.json and
generation_config.json. LoRA adapters are merged into the weights, or
written apart in `peft`'s format (`--peft`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from pipeline import atomic, fs, tokenizer as tokenizer_lib
from trainer import params as params_lib
from trainer.hf import weights
from trainer.hf.importer import RESAMPLE
from trainer.models import lora
from trainer.models.blip_text import BlipTextConfig
from trainer.models.captioner import decoder_config
from trainer.models.vit import ViTConfig


ADAPTER = "adapter"  # the folder of --peft's adapter, inside the exported model's


def export_hf(checkpoint_path: str, out_dir: str, peft: bool = False) -> str:
  """Writes the folder; LoRA adapters merged into the weights, or with
  `peft` kept apart: the base weights in `out_dir` and the adapters in
  `out_dir/adapter`, which `peft.PeftModel.from_pretrained` loads onto them."""
  from safetensors.numpy import save_file
  from transformers import GenerationConfig, GPT2Config as HFGPT2Config, VisionEncoderDecoderConfig

  # Hugging Face holds one tensor a layer: restore into that layout.
  r = params_lib.restore(checkpoint_path, ["config.model.scan_layers=false"])
  workdir, cfg = r.workdir, r.cfg
  pure = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(r.params))
  enc = ViTConfig.from_dict(cfg.model.encoder.to_dict())
  dec = decoder_config(cfg.model.decoder)
  spec = lora.Spec.of(cfg.model)
  if peft and spec is None:
    raise ValueError(f"--peft: {checkpoint_path} has no LoRA adapters (model.lora.rank is 0)")
  adapter = weights.to_peft(pure, enc, dec) if peft else None
  if spec is not None:  # the base weights, or W + (alpha / rank) A B
    pure = lora.strip(pure) if peft else lora.merge(pure, spec.scale)
  tensors = weights.to_hf(pure, enc, dec)  # without the tied LM head, restored on load

  tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  bos, eos, pad = dec.bos_token_id, dec.eos_token_id, dec.pad_token_id
  processor = image_processor(cfg)
  if isinstance(dec, BlipTextConfig):
    hf_config = blip_config(enc, dec, cfg.train.get("label_smoothing", 0.0))
  else:
    hf_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        encoder_config(enc),
        HFGPT2Config(**cfg.model.decoder.to_dict(), add_cross_attention=True, is_decoder=True))
    hf_config.decoder_start_token_id = bos
    hf_config.pad_token_id = pad
    hf_config.eos_token_id = eos
    hf_config.tie_word_embeddings = True
  generation = GenerationConfig(decoder_start_token_id=bos, bos_token_id=bos, eos_token_id=eos,
                                pad_token_id=pad, max_length=cfg.eval.max_length + 1,
                                num_beams=cfg.eval.num_beams,
                                no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size)
  with atomic.folder(out_dir) as tmp:
    hf_config.save_pretrained(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if hf_config.model_type == "blip":  # BlipProcessor's files: tokenizer and image processor
      from transformers import BlipProcessor
      BlipProcessor(image_processor=processor, tokenizer=tok).save_pretrained(tmp)
    else:
      tok.save_pretrained(tmp)
      processor.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    if adapter is not None:
      _save_peft_adapter(os.path.join(tmp, ADAPTER), adapter, hf_config, spec,
                         fs.absolute(out_dir))
  return fs.absolute(out_dir)


def blip_config(enc: ViTConfig, dec: BlipTextConfig, label_smoothing: float):
  """A BlipConfig: the vision tower's and the text decoder's fields; the
  caption's end (capjax's `eos_token_id`) is the text config's `sep_token_id`,
  where BLIP's `generate` stops."""
  from transformers import BlipConfig

  vision = {k: v for k, v in dataclasses.asdict(enc).items()
            if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "image_size", "patch_size", "hidden_act",
                     "layer_norm_eps")}
  vision["attention_dropout"] = enc.attention_probs_dropout_prob
  text = {k: v for k, v in dataclasses.asdict(dec).items() if k not in ("model_type",
                                                                          "eos_token_id")}
  text.update(sep_token_id=dec.eos_token_id, label_smoothing=float(label_smoothing))
  return BlipConfig(text_config=text, vision_config=vision, label_smoothing=float(label_smoothing))


def encoder_config(enc: ViTConfig):
  """The encoder's Hugging Face config, of its family's class. SigLIP's
  without its pooling head, which the captioner neither has nor needs."""
  from transformers import CONFIG_MAPPING

  cls = CONFIG_MAPPING[enc.model_type]
  known = set(cls().to_dict())
  fields = {k: v for k, v in dataclasses.asdict(enc).items() if k in known and k != "model_type"}
  if enc.model_type in ("clip_vision_model", "siglip_vision_model"):
    fields["attention_dropout"] = enc.attention_probs_dropout_prob
  if enc.model_type == "siglip_vision_model":
    fields["vision_use_head"] = False
  return cls(**fields)


def image_processor(cfg):
  """The run's image preprocessing as a Hugging Face image processor:
  "squash" resizes to height x width (ViTImageProcessor), then, with a
  crop_fraction under 1, crops the centre (DeiTImageProcessor); "crop"
  resizes the shorter side to image_size / crop_fraction and crops the centre
  square (CLIPImageProcessor, as CLIP and DINOv2 preprocess)."""
  from transformers import (BlipImageProcessor, CLIPImageProcessor, DeiTImageProcessor,
                            ViTImageProcessor)

  d = cfg.data
  common = dict(resample={v: k for k, v in RESAMPLE.items()}.get(d.resample, 3),
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(cfg.model.image_mean), image_std=list(cfg.model.image_std))
  side = int(round(d.image_size / d.get("crop_fraction", 1.0)))
  crop = {"height": d.image_size, "width": d.image_size}
  if d.resize == "crop":
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": side}, do_center_crop=True,
                              crop_size=crop, do_convert_rgb=True, **common)
  if side != d.image_size:
    return DeiTImageProcessor(do_resize=True, size={"height": side, "width": side},
                              do_center_crop=True, crop_size=crop, **common)
  if cfg.model.decoder.get("model_type") == BlipTextConfig.model_type:
    return BlipImageProcessor(do_resize=True, size=crop, do_convert_rgb=True, **common)
  return ViTImageProcessor(do_resize=True, size=crop, **common)


def _module_names(hf_config, saved_names: list[str]) -> dict[str, str]:
  """Module names as saved on disk to the names transformers gives them in
  memory (which peft targets): transformers 5 renames some on load (ViT's
  `attention.attention.query` is `attention.q_proj`). Read from the model
  itself, built on the meta device."""
  try:
    import torch
  except ImportError:
    raise ValueError("--peft needs torch (as peft does) to name the model's modules") from None
  from transformers import BlipForConditionalGeneration, VisionEncoderDecoderModel
  from transformers.conversion_mapping import get_model_conversion_mapping
  from transformers.core_model_loading import WeightConverter, rename_source_key

  with torch.device("meta"):
    model = (BlipForConditionalGeneration if hf_config.model_type == "blip"
             else VisionEncoderDecoderModel)(hf_config)
  transforms = get_model_conversion_mapping(model)
  converters = [t for t in transforms if isinstance(t, WeightConverter)]
  renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
  modules = dict(model.named_modules())
  out = {}
  for name in saved_names:
    new = rename_source_key(name + ".weight", renamings, converters)[0][:-len(".weight")]
    if new not in modules:
      raise ValueError(f"--peft: no module {new!r} (saved as {name!r}) in transformers' model")
    out[name] = new
  return out


def _save_peft_adapter(folder: str, adapters: dict, hf_config, spec: lora.Spec,
                       base: str) -> None:
  """adapter_config.json and adapter_model.safetensors, as `peft` saves a
  LoRA adapter of this model. Modules whose rank is not `spec.rank` (fused
  projections) get theirs, and an alpha that keeps alpha / rank, through
  rank_pattern and alpha_pattern."""
  from safetensors.numpy import save_file

  names = _module_names(hf_config, list(adapters))
  tensors, ranks = {}, {}
  for saved, (a, b) in adapters.items():
    module = names[saved]
    tensors[f"base_model.model.{module}.lora_A.weight"] = a
    tensors[f"base_model.model.{module}.lora_B.weight"] = b
    ranks[module] = a.shape[0]
  other = {re.escape(m): r for m, r in sorted(ranks.items()) if r != spec.rank}
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
      "target_modules": sorted(ranks), "bias": "none", "fan_in_fan_out": False,
      "rank_pattern": other,
      "alpha_pattern": {m: spec.alpha * r / spec.rank for m, r in other.items()},
      "inference_mode": True,
  }
  os.makedirs(folder)
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=1)
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def hub_token() -> str:
  """The Hub token, from the environment only (never a flag: flags reach logs)."""
  token = os.environ.get("HF_TOKEN")
  if not token:
    raise ValueError("--push-to-hub needs the HF_TOKEN environment variable")
  return token


def push_to_hub(folder: str, repo_id: str) -> str:
  """Uploads `folder` to the Hub repository `repo_id`; a failure is one line
  that leaves the folder in place and never shows the token."""
  from huggingface_hub import HfApi

  token = hub_token()
  try:
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(folder_path=folder, repo_id=repo_id))
  except Exception as e:
    reason = (str(e).strip().splitlines() or [""])[0].replace(token, "***")[:200]
    raise OSError(f"--push-to-hub {repo_id}: upload failed, {folder} kept "
                  f"({type(e).__name__}: {reason})") from None
