"""`capjax import-hf`: a Hugging Face ViT + GPT-2 captioner (or a ViT encoder
and a GPT-2 decoder) into a capjax run directory that `predict`, `eval` and
`train` take as it is.

The run directory holds the parameters as an Orbax checkpoint at step 0, the
config (model fields from the HF configs; image size, mean, std and resampling
from the image processor), and the tokenizer. Weights come from safetensors; a
`.bin` is read only through PyTorch's `weights_only` loader.
"""

from __future__ import annotations

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
from trainer.models.captioner import build_captioner
from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig

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


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's bicubic interpolation (align_corners=False, A=-0.75) as a matrix."""
  a = -0.75

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += cubic(k - t)
  return m


def interpolate_positions(pos: np.ndarray, grid: int) -> np.ndarray:
  """ViT position embeddings [1, 1 + n*n, D] to a grid x grid patch layout,
  as `ViTEmbeddings.interpolate_pos_encoding` computes them."""
  n = int(round((pos.shape[1] - 1) ** 0.5))
  if n == grid:
    return pos
  patches = pos[0, 1:].reshape(n, n, -1).astype(np.float64)
  w = _bicubic_matrix(n, grid)
  out = np.einsum("ij,jkd,lk->ild", w, patches, w).reshape(grid * grid, -1)
  return np.concatenate([pos[:, :1], out[None].astype(pos.dtype)], axis=1)


def _model_config(cfg: ConfigDict, enc: dict, dec: dict, image: dict,
                  image_size: int | None) -> None:
  fields = lambda cls, d: {k: d[k] for k in (f.name for f in cls.__dataclass_fields__.values())
                           if k in d and d[k] is not None}
  cfg.model.encoder = ConfigDict(fields(ViTConfig, enc))
  cfg.model.decoder = ConfigDict(fields(GPT2Config, dec))
  size = image.get("size", {})
  native = int(size.get("height", size.get("shortest_edge", enc.get("image_size", 224))))
  cfg.data.image_size = image_size or native
  cfg.model.encoder.image_size = cfg.data.image_size
  cfg.data.resize = "squash"  # ViTImageProcessor resizes to height x width
  cfg.data.resample = RESAMPLE.get(image.get("resample", 2), "bilinear")
  cfg.model.image_mean = tuple(image.get("image_mean", (0.5, 0.5, 0.5)))
  cfg.model.image_std = tuple(image.get("image_std", (0.5, 0.5, 0.5)))


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
  if hf_dir:
    top = read_json(hf_dir, "config.json")
    if top.get("model_type") != "vision-encoder-decoder":
      raise ValueError(f"{hf_dir}: model_type is {top.get('model_type')!r}, "
                       "expected 'vision-encoder-decoder' (or use --encoder/--decoder)")
    enc, dec = top["encoder"], top["decoder"]
    tensors, token_dir, image_dir = read_tensors(hf_dir), hf_dir, hf_dir
  else:
    enc, dec = read_json(encoder_dir, "config.json"), read_json(decoder_dir, "config.json")
    top = {}
    tensors, token_dir, image_dir = {}, decoder_dir, encoder_dir
    for prefix, folder in (("encoder.", encoder_dir), ("decoder.transformer.", decoder_dir)):
      for k, v in read_tensors(folder).items():
        for strip in ("vit.", "transformer."):  # task heads wrap the base model
          k = k[len(strip):] if k.startswith(strip) else k
        tensors[prefix + k] = v
  for name, sub, want in (("encoder", enc, "vit"), ("decoder", dec, "gpt2")):
    if sub.get("model_type") != want:
      raise ValueError(f"{name} model_type is {sub.get('model_type')!r}; capjax "
                       f"supports {want!r} here")
  weights.check_supported(dec, hf_dir or decoder_dir)
  image = read_json(image_dir, "preprocessor_config.json", required=False)
  _model_config(cfg, enc, dec, image, image_size)

  tok = tokenizer_lib.load(token_dir)
  bos, eos, pad = tokenizer_lib.special_ids(tok)
  first = lambda *values: next(v for v in values if v is not None)
  # Decoding starts from the model's decoder_start_token_id, as `generate` does.
  cfg.model.decoder.bos_token_id = first(top.get("decoder_start_token_id"),
                                         dec.get("bos_token_id"), bos)
  cfg.model.decoder.eos_token_id = first(top.get("eos_token_id"), dec.get("eos_token_id"), eos)
  cfg.model.decoder.pad_token_id = first(top.get("pad_token_id"), dec.get("pad_token_id"),
                                         cfg.model.decoder.eos_token_id)

  enc_cfg = ViTConfig.from_dict(enc)  # the checkpoint's own image size
  dec_cfg = GPT2Config.from_dict(dec)
  model = build_captioner(cfg.model, seed)  # fills what a checkpoint lacks
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  loaded = weights.to_capjax(
      tensors, enc_cfg, dec_cfg, with_projection=bool(hf_dir) and
      enc_cfg.hidden_size != dec_cfg.n_embd, source=hf_dir or f"{encoder_dir} + {decoder_dir}")
  grid = cfg.data.image_size // enc_cfg.patch_size
  loaded["encoder"]["position_embeddings"] = interpolate_positions(
      loaded["encoder"]["position_embeddings"], grid)
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
