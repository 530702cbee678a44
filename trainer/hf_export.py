"""`capjax export-hf`: a capjax checkpoint as a Hugging Face folder that
`VisionEncoderDecoderModel.from_pretrained` loads: config.json,
model.safetensors, tokenizer files, preprocessor_config.json and
generation_config.json.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from pipeline import atomic, tokenizer as tokenizer_lib
from trainer import hf_checkpoint, params as params_lib
from trainer.hf_import import RESAMPLE
from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig


def export_hf(checkpoint_path: str, out_dir: str) -> str:
  from safetensors.numpy import save_file
  from transformers import (GenerationConfig, GPT2Config as HFGPT2Config, ViTConfig as HFViTConfig,
                            ViTImageProcessor, VisionEncoderDecoderConfig)

  # Hugging Face holds one tensor a layer: restore into that layout.
  r = params_lib.restore(checkpoint_path, ["config.model.scan_layers=false"])
  workdir, cfg = r.workdir, r.cfg
  pure = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(r.params))
  enc = ViTConfig.from_dict(cfg.model.encoder.to_dict())
  dec = GPT2Config.from_dict(cfg.model.decoder.to_dict())
  tensors = hf_checkpoint.to_hf(pure, enc, dec)
  tensors.pop("decoder.lm_head.weight")  # tied to the token embedding on load

  tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer"))
  bos, eos, pad = dec.bos_token_id, dec.eos_token_id, dec.pad_token_id
  hf_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      HFViTConfig(**cfg.model.encoder.to_dict()),
      HFGPT2Config(**cfg.model.decoder.to_dict(), add_cross_attention=True, is_decoder=True))
  hf_config.decoder_start_token_id = bos
  hf_config.pad_token_id = pad
  hf_config.eos_token_id = eos
  hf_config.tie_word_embeddings = True
  resample = {v: k for k, v in RESAMPLE.items()}.get(cfg.data.resample, 3)
  processor = ViTImageProcessor(
      do_resize=True, size={"height": cfg.data.image_size, "width": cfg.data.image_size},
      resample=resample, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=list(cfg.model.image_mean), image_std=list(cfg.model.image_std))
  generation = GenerationConfig(decoder_start_token_id=bos, bos_token_id=bos, eos_token_id=eos,
                                pad_token_id=pad, max_length=cfg.eval.max_length + 1,
                                num_beams=cfg.eval.num_beams,
                                no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size)
  with atomic.folder(out_dir) as tmp:
    hf_config.save_pretrained(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    generation.save_pretrained(tmp)
  return os.path.abspath(out_dir)


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
