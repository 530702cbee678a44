"""Hugging Face checkpoints to capjax parameters and back.

One table maps every tensor of a `VisionEncoderDecoderModel` (an encoder of
`trainer.models.vit`'s families + GPT-2) or a `BlipForConditionalGeneration`
state dict to a capjax parameter
with the layout change it needs; import and export both read it, so they
cannot drift apart. Weights are read and written
as safetensors, never unpickled.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from trainer.models.blip_text import BlipTextConfig
from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig

Path = tuple[Any, ...]

# Layout changes, HF -> capjax, and their inverses.
_SAME = (lambda w: w, lambda w: w)
_LINEAR = (lambda w: w.T, lambda w: w.T)  # torch Linear stores [out, in]
_PATCH = (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
_TOKEN = (lambda w: w[None, None], lambda w: w[0, 0])  # CLIP's class embedding [D]
_TABLE = (lambda w: w[None], lambda w: w[0])  # an nn.Embedding of positions [N, D]
_ROW = (lambda w: w[0], lambda w: w[None])  # DINOv2's mask token [1, D], kept 1-D (no decay)

# Fused projections, split into their parts: GPT-2's `Conv1D` already stores
# [in, out] (parts side by side in axis 1); BLIP's vision `qkv` is a torch
# Linear [out, in] (parts stacked in axis 0).
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value"),
          "linear_qkv": ("query", "key", "value")}


def _linears(hf: str, ours: Path, names: dict, biases: set) -> Iterator:
  for h, o in names.items():
    yield hf + h + ".weight", ours + o + ("kernel",), _LINEAR
    if h in biases:
      yield hf + h + ".bias", ours + o + ("bias",), _SAME


def _norm(hf: str, ours: Path) -> Iterator:
  yield hf + ".weight", ours + ("scale",), _SAME
  yield hf + ".bias", ours + ("bias",), _SAME


def _vit_entries(cfg: ViTConfig, prefix: str) -> Iterator[tuple[str, Path, tuple]]:
  """ViTModel, DeiTModel and Dinov2Model (with registers) as saved."""
  e, fam, emb = ("encoder",), cfg.family, f"{prefix}embeddings."
  dino = cfg.model_type.startswith("dinov2")
  for name in fam.tokens:
    yield emb + name, e + (name,), _SAME
  if cfg.num_register_tokens:
    yield emb + "register_tokens", e + ("register_tokens",), _SAME
  if fam.mask_token and cfg.use_mask_token:
    yield emb + "mask_token", e + ("mask_token",), _ROW
  yield emb + "position_embeddings", e + ("position_embeddings",), _SAME
  yield emb + "patch_embeddings.projection.weight", e + ("patch_embed", "kernel"), _PATCH
  yield emb + "patch_embeddings.projection.bias", e + ("patch_embed", "bias"), _SAME
  mlp = (("mlp.weights_in", "mlp.weights_out") if cfg.use_swiglu_ffn else
         ("mlp.fc1", "mlp.fc2") if dino else ("intermediate.dense", "output.dense"))
  norms = ("norm1", "norm2") if dino else ("layernorm_before", "layernorm_after")
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{prefix}encoder.layer.{i}.", e + ("layers", i)
    linears = {
        "attention.attention.query": ("attention", "query"),
        "attention.attention.key": ("attention", "key"),
        "attention.attention.value": ("attention", "value"),
        "attention.output.dense": ("attention", "out"),
        mlp[0]: ("mlp", "fc"),
        mlp[1]: ("mlp", "proj"),
    }
    qkv = {"attention.attention.query", "attention.attention.key", "attention.attention.value"}
    yield from _linears(hf, ours, linears, set(linears) - (set() if cfg.qkv_bias else qkv))
    for h, o in zip(norms, ("layernorm_before", "layernorm_after")):
      yield from _norm(hf + h, ours + (o,))
    if fam.layer_scale:
      for k in (1, 2):
        yield f"{hf}layer_scale{k}.lambda1", ours + (f"layer_scale{k}",), _SAME
  yield from _norm(f"{prefix}layernorm", e + ("layernorm",))


def _clip_entries(cfg: ViTConfig, prefix: str) -> Iterator[tuple[str, Path, tuple]]:
  """CLIPVisionModel and SiglipVisionModel as saved (SigLIP's pooling head
  is not part of the captioner)."""
  e, fam, emb = ("encoder",), cfg.family, f"{prefix}embeddings."
  if "cls_token" in fam.tokens:
    yield emb + "class_embedding", e + ("cls_token",), _TOKEN
  yield emb + "patch_embedding.weight", e + ("patch_embed", "kernel"), _PATCH
  if fam.patch_bias:
    yield emb + "patch_embedding.bias", e + ("patch_embed", "bias"), _SAME
  yield emb + "position_embedding.weight", e + ("position_embeddings",), _TABLE
  if fam.pre_layernorm:
    yield from _norm(f"{prefix}pre_layrnorm", e + ("pre_layernorm",))
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{prefix}encoder.layers.{i}.", e + ("layers", i)
    linears = {
        "self_attn.q_proj": ("attention", "query"), "self_attn.k_proj": ("attention", "key"),
        "self_attn.v_proj": ("attention", "value"), "self_attn.out_proj": ("attention", "out"),
        "mlp.fc1": ("mlp", "fc"), "mlp.fc2": ("mlp", "proj"),
    }
    yield from _linears(hf, ours, linears, set(linears))
    yield from _norm(hf + "layer_norm1", ours + ("layernorm_before",))
    yield from _norm(hf + "layer_norm2", ours + ("layernorm_after",))
  yield from _norm(f"{prefix}post_layernorm", e + ("layernorm",))


def _blip_vision_entries(cfg: ViTConfig, prefix: str) -> Iterator[tuple[str, Path, tuple]]:
  """BlipVisionModel as saved."""
  e, emb = ("encoder",), f"{prefix}embeddings."
  yield emb + "class_embedding", e + ("cls_token",), _SAME
  yield emb + "patch_embedding.weight", e + ("patch_embed", "kernel"), _PATCH
  yield emb + "patch_embedding.bias", e + ("patch_embed", "bias"), _SAME
  yield emb + "position_embedding", e + ("position_embeddings",), _SAME
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{prefix}encoder.layers.{i}.", e + ("layers", i)
    yield hf + "self_attn.qkv", ours + ("attention",), "linear_qkv"
    linears = {"self_attn.projection": ("attention", "out"), "mlp.fc1": ("mlp", "fc"),
               "mlp.fc2": ("mlp", "proj")}
    yield from _linears(hf, ours, linears, set(linears))
    yield from _norm(hf + "layer_norm1", ours + ("layernorm_before",))
    yield from _norm(hf + "layer_norm2", ours + ("layernorm_after",))
  yield from _norm(f"{prefix}post_layernorm", e + ("layernorm",))


def encoder_entries(cfg: ViTConfig, prefix: str) -> Iterator[tuple[str, Path, tuple]]:
  """The encoder's tensors, by its family's names."""
  if cfg.model_type in ("clip_vision_model", "siglip_vision_model"):
    return _clip_entries(cfg, prefix)
  if cfg.model_type == "blip_vision_model":
    return _blip_vision_entries(cfg, prefix)
  return _vit_entries(cfg, prefix)


# A key every checkpoint of the family holds, whatever wraps the model: what
# finds the encoder's prefix in a state dict.
ANCHOR = {"clip_vision_model": "embeddings.patch_embedding.weight",
          "siglip_vision_model": "embeddings.patch_embedding.weight",
          "blip_vision_model": "embeddings.patch_embedding.weight"}
ANCHOR_DEFAULT = "embeddings.patch_embeddings.projection.weight"


def _gpt2_entries(cfg: GPT2Config, prefix: str) -> Iterator[tuple[str, Path, Any]]:
  d = ("decoder",)
  yield f"{prefix}wte.weight", d + ("wte", "embedding"), _SAME
  yield f"{prefix}wpe.weight", d + ("wpe", "embedding"), _SAME
  for i in range(cfg.n_layer):
    hf, ours = f"{prefix}h.{i}.", d + ("h", i)
    for norm in ("ln_1", "ln_cross_attn", "ln_2"):
      yield hf + norm + ".weight", ours + (norm, "scale"), _SAME
      yield hf + norm + ".bias", ours + (norm, "bias"), _SAME
    yield hf + "attn.c_attn", ours + ("attn",), "qkv"
    yield hf + "crossattention.c_attn", ours + ("crossattention",), "kv"
    convs = {"attn.c_proj": ("attn", "out"), "crossattention.q_attn": ("crossattention", "query"),
             "crossattention.c_proj": ("crossattention", "out"),
             "mlp.c_fc": ("mlp", "fc"), "mlp.c_proj": ("mlp", "proj")}
    for h, o in convs.items():
      yield hf + h + ".weight", ours + o + ("kernel",), _SAME
      yield hf + h + ".bias", ours + o + ("bias",), _SAME
  yield f"{prefix}ln_f.weight", d + ("ln_f", "scale"), _SAME
  yield f"{prefix}ln_f.bias", d + ("ln_f", "bias"), _SAME


def _blip_text_entries(cfg: BlipTextConfig, prefix: str) -> Iterator[tuple[str, Path, Any]]:
  """BlipTextLMHeadModel as saved; its decoder's weight and bias are tied to
  the word embeddings and the head's bias."""
  d, bert = ("decoder",), f"{prefix}bert."
  yield bert + "embeddings.word_embeddings.weight", d + ("word_embeddings", "embedding"), _SAME
  yield (bert + "embeddings.position_embeddings.weight", d + ("position_embeddings", "embedding"),
         _SAME)
  yield from _norm(bert + "embeddings.LayerNorm", d + ("embed_norm",))
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{bert}encoder.layer.{i}.", d + ("layers", i)
    linears = {"intermediate.dense": ("mlp", "fc"), "output.dense": ("mlp", "proj")}
    for part in ("attention", "crossattention"):
      linears.update({f"{part}.self.{p}": (part, p) for p in ("query", "key", "value")})
      linears[f"{part}.output.dense"] = (part, "out")
      yield from _norm(f"{hf}{part}.output.LayerNorm", ours + (f"{part}_norm",))
    yield from _linears(hf, ours, linears, set(linears))
    yield from _norm(hf + "output.LayerNorm", ours + ("mlp_norm",))
  head = f"{prefix}cls.predictions."
  yield from _linears(head, d, {"transform.dense": ("head_dense",)}, {"transform.dense"})
  yield from _norm(head + "transform.LayerNorm", d + ("head_norm",))
  yield head + "bias", d + ("head_bias",), _SAME


# Where each decoder's checkpoint class keeps the encoder and the decoder.
PREFIXES = {"gpt2": ("encoder.", "decoder.transformer."),
            "blip_text_model": ("vision_model.", "text_decoder.")}


def _kind(dec) -> str:
  return dec.model_type if isinstance(dec, BlipTextConfig) else "gpt2"


def _entries(enc: ViTConfig, dec: GPT2Config | BlipTextConfig, enc_prefix: str,
             dec_prefix: str, with_projection: bool):
  yield from encoder_entries(enc, enc_prefix)
  if isinstance(dec, BlipTextConfig):
    yield from _blip_text_entries(dec, dec_prefix)
  else:
    yield from _gpt2_entries(dec, dec_prefix)
  if with_projection:
    yield "enc_to_dec_proj.weight", ("enc_to_dec_proj", "kernel"), _LINEAR
    yield "enc_to_dec_proj.bias", ("enc_to_dec_proj", "bias"), _SAME


def _set(tree: dict, path: Path, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: Path):
  for p in path:
    tree = tree[p]
  return tree


def _width(dec) -> int:
  return dec.hidden_size if isinstance(dec, BlipTextConfig) else dec.n_embd


def _split(how: str, w: np.ndarray, b: np.ndarray) -> Iterator[tuple[str, np.ndarray,
                                                                      np.ndarray]]:
  """A fused projection's parts: (name, kernel [in, out], bias)."""
  parts = _FUSED[how]
  kernels = ([k.T for k in np.split(w, len(parts), axis=0)] if how == "linear_qkv"
             else np.split(w, len(parts), axis=1))
  yield from zip(parts, kernels, np.split(b, len(parts)))


def _fuse(how: str, layer: dict) -> tuple[np.ndarray, np.ndarray]:
  parts = _FUSED[how]
  kernels = [np.asarray(layer[p]["kernel"]) for p in parts]
  w = (np.concatenate([k.T for k in kernels], axis=0) if how == "linear_qkv"
       else np.concatenate(kernels, axis=1))
  return np.ascontiguousarray(w), np.concatenate([np.asarray(layer[p]["bias"]) for p in parts])


def to_capjax(tensors: dict[str, np.ndarray], enc: ViTConfig, dec: GPT2Config | BlipTextConfig,
              enc_prefix: str | None = None, dec_prefix: str | None = None,
              with_projection: bool | None = None, source: str = "checkpoint",
              fresh: tuple[str, ...] = ()) -> dict:
  """HF tensors to a capjax pure parameter dict. Tensors the table does not
  name (a ViT pooler, GPT-2's attention-mask buffers, a tied LM head) are
  ignored; a missing or misshapen one is an error naming the tensor, but for
  those whose names hold one of `fresh`, left out (to be newly initialised:
  a plain GPT-2's cross-attention). The prefixes default to where the
  decoder's checkpoint class keeps each part (`PREFIXES`)."""
  default_enc, default_dec = PREFIXES[_kind(dec)]
  enc_prefix = default_enc if enc_prefix is None else enc_prefix
  dec_prefix = default_dec if dec_prefix is None else dec_prefix
  if with_projection is None:
    with_projection = not isinstance(dec, BlipTextConfig) and enc.hidden_size != _width(dec)
  out: dict = {}

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"{source}: no tensor {name!r}")
    return np.asarray(tensors[name], np.float32)

  for name, path, how in _entries(enc, dec, enc_prefix, dec_prefix, with_projection):
    if (any(f in name for f in fresh)
        and not any(n in tensors for n in (name, name + ".weight"))):
      continue
    if how in _FUSED:
      for part, kernel, bias in _split(how, take(name + ".weight"), take(name + ".bias")):
        _set(out, path + (part, "kernel"), kernel)
        _set(out, path + (part, "bias"), bias)
    else:
      _set(out, path, how[0](take(name)))
  return out


def to_hf(params: dict, enc: ViTConfig, dec: GPT2Config | BlipTextConfig
          ) -> dict[str, np.ndarray]:
  """A capjax pure parameter dict to the tensors of a `VisionEncoderDecoderModel`
  (GPT-2) or a `BlipForConditionalGeneration`, tied ones left out."""
  with_projection = "enc_to_dec_proj" in params and params["enc_to_dec_proj"] is not None
  out = {}
  for name, path, how in _entries(enc, dec, *PREFIXES[_kind(dec)], with_projection):
    if how in _FUSED:
      out[name + ".weight"], out[name + ".bias"] = _fuse(how, _get(params, path))
    else:
      out[name] = np.ascontiguousarray(how[1](np.asarray(_get(params, path))))
  return out


def to_peft(params: dict, enc: ViTConfig, dec: GPT2Config | BlipTextConfig
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The LoRA adapters of a capjax pure parameter dict in `peft`'s layout:
  {module name as saved: (lora_A [rank, in], lora_B [out, rank])}. A fused
  GPT-2 projection (`c_attn`: query, key, value) holds its parts' adapters
  side by side, rank r for each part that has one, B zero across the outputs
  of the others: the same update, exactly."""
  with_projection = "enc_to_dec_proj" in params and params["enc_to_dec_proj"] is not None
  out = {}
  for name, path, how in _entries(enc, dec, *PREFIXES[_kind(dec)], with_projection):
    if how in _FUSED:
      layer, parts = _get(params, path), _FUSED[how]
      with_adapter = [j for j, p in enumerate(parts) if "lora_a" in layer[p]]
      if not with_adapter:
        continue
      ends = np.cumsum([0] + [layer[p]["kernel"].shape[1] for p in parts])
      a = np.concatenate([layer[parts[j]]["lora_a"] for j in with_adapter], axis=1)
      b = np.zeros((a.shape[1], ends[-1]), np.float32)
      row = 0
      for j in with_adapter:
        part = np.asarray(layer[parts[j]]["lora_b"])
        b[row:row + len(part), ends[j]:ends[j + 1]] = part
        row += len(part)
      module = name
    elif path[-1] == "kernel" and "lora_a" in _get(params, path[:-1]):
      layer = _get(params, path[:-1])
      a, b = layer["lora_a"], layer["lora_b"]
      module = name[:-len(".weight")]
    else:
      continue
    out[module] = (np.ascontiguousarray(np.asarray(a).T), np.ascontiguousarray(np.asarray(b).T))
  return out


def check_supported(decoder_config: dict, source: str) -> None:
  """Rejects GPT-2 options that change the computation and capjax lacks."""
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False)):
    if decoder_config.get(key, supported) != supported:
      raise ValueError(f"{source}: {key}={decoder_config[key]} is not supported")

