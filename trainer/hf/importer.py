"""`capjax import-hf`: a Hugging Face captioner (a VisionEncoderDecoderModel
of a ViT, DeiT, CLIP or SigLIP vision tower or DINOv2 encoder and GPT-2, or a
BlipForConditionalGeneration; or such an encoder, or a whole CLIP, SigLIP or
BLIP model, and a GPT-2 decoder) into a capjax run directory that `predict`,
`eval` and `train` take as it is.

The run directory holds the parameters as an Orbax checkpoint at step 0, the
config (model fields from the HF configs; image size, mean, std and resampling
from the image processor), and the tokenizer. Weights come from safetensors; a
`.bin` is read only through PyTorch's `weights_only` loader.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from pipeline import atomic, fs, tokenizer as tokenizer_lib
from trainer import checkpoint, config as config_lib, params as params_lib
from trainer.hf import weights
from trainer.models.blip_text import BlipTextConfig
from trainer.models.captioner import build_captioner, decoder_config
from trainer.models.vit import FAMILIES, ViTConfig

# PIL's resampling codes, as image processors store them.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def read_json(folder: str, name: str, required: bool = True) -> dict:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    if required:
      raise FileNotFoundError(f"{folder}: no {name}")
    return {}
  with open(path) as f:
    return json.load(f)


def read_tensors(folder: str) -> dict[str, np.ndarray]:
  """All weights of a checkpoint folder, as float32 numpy arrays."""
  from safetensors.flax import load_file

  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if files:
    out = {}
    for f in files:
      out.update({k: np.asarray(v, np.float32) for k, v in load_file(f).items()})
    return out
  bins = sorted(glob.glob(os.path.join(folder, "*.bin")))
  if not bins:
    raise FileNotFoundError(f"{folder}: no *.safetensors (nor *.bin) weights")
  try:
    import torch
  except ImportError:
    raise ValueError(f"{folder}: only .bin weights, and reading them safely needs PyTorch "
                     "(pip install torch), or convert them to safetensors") from None
  out = {}
  for f in bins:
    try:  # weights_only: tensors and plain containers, never code from the file
      state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"{f}: refused, not a plain tensor file "
                       f"({str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
      raise ValueError(f"{f}: not a state dict of tensors")
    out.update({k: v.float().numpy() for k, v in state.items()})
  return out


def _cubic(x: float, a: float) -> float:
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return 0.0


def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """PyTorch's bicubic interpolation of one axis (align_corners=False) as a
  matrix [n_out, n_in]: A = -0.75 with edges clamped; or with `antialias`
  PIL's filter (A = -0.5, stretched by the shrink factor, truncated at the
  edges and normalised), as `interpolate(..., antialias=True)` computes it."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    if antialias:
      support, inv = (2 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      w = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
      m[i, lo:hi] = w / w.sum()
      continue
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += _cubic(k - t, -0.75)
  return m


def interpolate_positions(pos: np.ndarray, grid: int, tokens: int = 1,
                          antialias: bool = False) -> np.ndarray:
  """Position embeddings [1, tokens + n*n, D] (the first `tokens` for the
  class and distillation tokens) to a grid x grid patch layout, as the
  models' `interpolate_pos_encoding` computes them (bicubic; DINOv2 with
  registers antialiased)."""
  n = int(round((pos.shape[1] - tokens) ** 0.5))
  if n == grid:
    return pos
  patches = pos[0, tokens:].reshape(n, n, -1).astype(np.float64)
  w = bicubic_matrix(n, grid, antialias)
  out = np.einsum("ij,jkd,lk->ild", w, patches, w).reshape(grid * grid, -1)
  return np.concatenate([pos[:, :tokens], out[None].astype(pos.dtype)], axis=1)


# Whole image-text models whose vision tower `--encoder` takes.
TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model",
          "blip": "blip_vision_model"}


def encoder_config(enc: dict, source: str) -> dict:
  """An encoder's config.json (or a whole CLIP or SigLIP model's, for its
  vision tower) as capjax's `model.encoder` fields, with the defaults of its
  Hugging Face class filled in (a saved config.json leaves them out)."""
  from transformers import AutoConfig

  kind = enc.get("model_type")
  if kind not in FAMILIES and kind not in TOWERS:
    raise ValueError(f"{source}: encoder model_type is {kind!r}; capjax supports "
                     f"{', '.join(sorted(FAMILIES))} (and whole {', '.join(sorted(TOWERS))} "
                     "models, for their vision tower)")
  full = AutoConfig.for_model(**enc)
  full = (full.vision_config if kind in TOWERS else full).to_dict()
  full["model_type"] = TOWERS.get(kind, kind)
  if full["model_type"] in TOWERS.values():  # no dropout but on attention
    full["attention_probs_dropout_prob"] = full.get("attention_dropout", 0.0)
    full["hidden_dropout_prob"] = 0.0
  names = {f.name for f in dataclasses.fields(ViTConfig)}
  out = {k: v for k, v in full.items() if k in names and v is not None}
  for k in ("image_size", "patch_size"):
    if isinstance(out.get(k), (list, tuple)):
      if len(set(out[k])) != 1:
        raise ValueError(f"{source}: {k} {out[k]} is not square; capjax takes square images")
      out[k] = out[k][0]
  return out


def _encoder_tensors(tensors: dict, enc: ViTConfig, under: str, source: str) -> dict:
  """The tensors with the encoder's moved under "encoder.", wherever the
  checkpoint nests it (`vision_model.` in whole CLIP and SigLIP models and
  older saves, `vit.`/`dinov2.` in task models), the rest as they were."""
  anchor = weights.ANCHOR.get(enc.model_type, weights.ANCHOR_DEFAULT)
  found = sorted((k[:-len(anchor)] for k in tensors
                  if k.endswith(anchor) and k.startswith(under)), key=len)
  if not found:
    raise KeyError(f"{source}: no tensor {under}...{anchor} (the {enc.model_type} encoder's)")
  prefix = found[0]
  return {("encoder." + k[len(prefix):] if k.startswith(prefix) else k): v
          for k, v in tensors.items()}


def _image_config(cfg: ConfigDict, image: dict, native: int, image_size: int | None) -> None:
  """The image processor's resizing, resampling and normalisation as the
  data and model config: a resize to height x width is "squash"; the
  shorter side to S and a centre crop C (CLIP, DINOv2) is "crop"; either
  followed by a centre crop C of a resize to S (CLIP, DINOv2, DeiT) has
  `crop_fraction` C / S."""
  size = image.get("size") or {}
  size = {"height": size, "width": size} if isinstance(size, int) else size
  crop = image.get("crop_size") or {}
  crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
  square = "shortest_edge" not in size
  side = int(size.get("height", native) if square else size["shortest_edge"])
  cut = int(crop.get("height", side)) if image.get("do_center_crop", bool(crop)) else side
  cfg.data.resize = "squash" if square else "crop"
  cfg.data.crop_fraction = min(1.0, cut / side)
  cfg.data.image_size = image_size or min(cut, side)
  cfg.data.resample = RESAMPLE.get(image.get("resample", 2), "bilinear")
  cfg.model.image_mean = tuple(image.get("image_mean", (0.5, 0.5, 0.5)))
  cfg.model.image_std = tuple(image.get("image_std", (0.5, 0.5, 0.5)))


def blip_text_config(top: dict) -> dict:
  """A BlipForConditionalGeneration's text_config.json as capjax's
  `model.decoder` fields, its class's defaults filled in: captions end at
  its `sep_token_id`, where its `generate` stops them."""
  from transformers import AutoConfig

  text = AutoConfig.for_model(**top).text_config.to_dict()
  text["model_type"] = BlipTextConfig.model_type
  text["eos_token_id"] = text["sep_token_id"]
  return text


def _model_config(cfg: ConfigDict, enc: dict, dec: dict, image: dict,
                  image_size: int | None) -> None:
  cls = type(decoder_config(dec))
  fields = {k: dec[k] for k in (f.name for f in dataclasses.fields(cls))
            if k in dec and dec[k] is not None}
  cfg.model.encoder = ConfigDict(enc)
  cfg.model.decoder = ConfigDict(fields)
  _image_config(cfg, image, enc.get("image_size", 224), image_size)
  cfg.model.encoder.image_size = cfg.data.image_size


def import_hf(out_dir: str, hf_dir: str | None = None, encoder_dir: str | None = None,
              decoder_dir: str | None = None, base_config: str = "demo",
              overrides: Sequence[str] = (), image_size: int | None = None,
              seed: int = 0) -> ConfigDict:
  """Writes a capjax run directory at `out_dir`; returns its config.

  Either `hf_dir` (a VisionEncoderDecoderModel folder) or both `encoder_dir`
  and `decoder_dir`; with the latter the cross-attention (and the projection
  between widths) is newly initialised, as the classic recipe did.
  """
  if (hf_dir is None) == (encoder_dir is None or decoder_dir is None):
    raise ValueError("give either HF_DIR or both --encoder and --decoder")
  if fs.is_bucket(out_dir) and fs.isdir(out_dir):
    raise ValueError(f"--out {out_dir}: holds files already; in a bucket (no rename to "
                     "replace a folder whole) import-hf writes a new folder")
  cfg = config_lib.load(base_config, overrides)
  top = {}
  if hf_dir:
    top = read_json(hf_dir, "config.json")
    kind = top.get("model_type")
    if kind not in ("vision-encoder-decoder", "blip"):
      raise ValueError(f"{hf_dir}: model_type is {kind!r}, expected 'vision-encoder-decoder' "
                       "or 'blip' (or use --encoder/--decoder)")
    enc = encoder_config(top if kind == "blip" else top["encoder"], hf_dir)
    dec = blip_text_config(top) if kind == "blip" else top["decoder"]
    enc_cfg = ViTConfig.from_dict(enc)  # the checkpoint's own image size
    under = "vision_model." if kind == "blip" else "encoder."
    tensors = _encoder_tensors(read_tensors(hf_dir), enc_cfg, under, hf_dir)
    token_dir, image_dir = hf_dir, hf_dir
  else:
    enc = encoder_config(read_json(encoder_dir, "config.json"), encoder_dir)
    dec = read_json(decoder_dir, "config.json")
    enc_cfg = ViTConfig.from_dict(enc)
    tensors = _encoder_tensors(read_tensors(encoder_dir), enc_cfg, "", encoder_dir)
    tensors = {k: v for k, v in tensors.items() if k.startswith("encoder.")}  # no text tower
    token_dir, image_dir = decoder_dir, encoder_dir
    for k, v in read_tensors(decoder_dir).items():
      k = k[len("transformer."):] if k.startswith("transformer.") else k  # a task head's
      tensors["decoder.transformer." + k] = v
  blip = dec.get("model_type") == BlipTextConfig.model_type
  if dec.get("model_type") != "gpt2" and not blip:
    raise ValueError(f"decoder model_type is {dec.get('model_type')!r}; capjax "
                     "supports 'gpt2' here")
  if not blip:
    weights.check_supported(dec, hf_dir or decoder_dir)
  image = (read_json(image_dir, "preprocessor_config.json", required=False) or
           # a processor saved by transformers 5 nests its image processor's settings
           read_json(image_dir, "processor_config.json", required=False).get("image_processor", {}))
  _model_config(cfg, enc, dec, image, image_size)

  tok = tokenizer_lib.load(token_dir)
  if blip:  # its own [DEC] start, [SEP] end and padding, and its loss's smoothing
    cfg.train.label_smoothing = float(dec.get("label_smoothing") or 0.0)
  else:
    bos, eos, pad = tokenizer_lib.special_ids(tok)
    first = lambda *values: next(v for v in values if v is not None)
    # Decoding starts from the model's decoder_start_token_id, as `generate` does.
    cfg.model.decoder.bos_token_id = first(top.get("decoder_start_token_id"),
                                           dec.get("bos_token_id"), bos)
    cfg.model.decoder.eos_token_id = first(top.get("eos_token_id"), dec.get("eos_token_id"),
                                           eos)
    cfg.model.decoder.pad_token_id = first(top.get("pad_token_id"), dec.get("pad_token_id"),
                                           cfg.model.decoder.eos_token_id)

  dec_cfg = decoder_config(cfg.model.decoder)
  model = build_captioner(cfg.model, seed)  # fills what a checkpoint lacks
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  loaded = weights.to_capjax(
      tensors, enc_cfg, dec_cfg, enc_prefix="encoder.",
      dec_prefix=None if blip else "decoder.transformer.",
      with_projection=bool(hf_dir) and not blip and enc_cfg.hidden_size != dec_cfg.n_embd,
      source=hf_dir or f"{encoder_dir} + {decoder_dir}",
      fresh=() if hf_dir else (".crossattention.", ".ln_cross_attn."))
  grid = cfg.data.image_size // enc_cfg.patch_size
  loaded["encoder"]["position_embeddings"] = interpolate_positions(
      loaded["encoder"]["position_embeddings"], grid, len(enc_cfg.family.tokens),
      antialias=enc_cfg.model_type == "dinov2_with_registers")
  _merge(pure, params_lib.to_layout(loaded, cfg.model.scan_layers), ())
  nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, pure))

  if fs.is_bucket(out_dir):
    # Complete once its checkpoint is: Orbax's or capjax's commit marker, written last.
    with atomic.folder(fs.join(out_dir, "tokenizer"), last=()) as tmp:
      tok.save_pretrained(tmp)
    fs.write_text(fs.join(out_dir, "config.json"), json.dumps(cfg.to_dict(), indent=1))
    checkpoint.save_params(out_dir, 0, params, cfg)
    return cfg
  with atomic.folder(out_dir) as tmp:
    tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=1)
    checkpoint.save_params(tmp, 0, params, cfg)
  return cfg


def _merge(into: dict, loaded: dict, path: tuple) -> None:
  """Copies `loaded` over `into`, checking every shape."""
  for k, v in loaded.items():
    if k not in into:
      raise KeyError(f"unexpected parameter {'/'.join(map(str, path + (k,)))}")
    if isinstance(v, dict):
      _merge(into[k], v, path + (k,))
    else:
      if np.shape(into[k]) != np.shape(v):
        raise ValueError(f"{'/'.join(map(str, path + (k,)))}: shape {np.shape(v)} in the "
                         f"checkpoint, {np.shape(into[k])} in the model")
      into[k] = v
