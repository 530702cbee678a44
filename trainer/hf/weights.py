"""Hugging Face checkpoints to capjax parameters and back.

One table maps every tensor of a `VisionEncoderDecoderModel` (ViT + GPT-2)
state dict to a capjax parameter with the layout change it needs; import and
export both read it, so they cannot drift apart. Weights are read and written
as safetensors, never unpickled.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from trainer.models.gpt2 import GPT2Config
from trainer.models.vit import ViTConfig

Path = tuple[Any, ...]

# Layout changes, HF -> capjax, and their inverses.
_SAME = (lambda w: w, lambda w: w)
_LINEAR = (lambda w: w.T, lambda w: w.T)  # torch Linear stores [out, in]
_PATCH = (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))  # OIHW <-> HWIO

# GPT-2's `Conv1D` already stores [in, out]; its fused projections are split.
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}


def _vit_entries(cfg: ViTConfig, prefix: str) -> Iterator[tuple[str, Path, tuple]]:
  e = ("encoder",)
  yield f"{prefix}embeddings.cls_token", e + ("cls_token",), _SAME
  yield f"{prefix}embeddings.position_embeddings", e + ("position_embeddings",), _SAME
  for p in ("weight", "bias"):
    yield (f"{prefix}embeddings.patch_embeddings.projection.{p}",
           e + ("patch_embed", "kernel" if p == "weight" else "bias"),
           _PATCH if p == "weight" else _SAME)
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{prefix}encoder.layer.{i}.", e + ("layers", i)
    linears = {
        "attention.attention.query": ("attention", "query"),
        "attention.attention.key": ("attention", "key"),
        "attention.attention.value": ("attention", "value"),
        "attention.output.dense": ("attention", "out"),
        "intermediate.dense": ("mlp", "fc"),
        "output.dense": ("mlp", "proj"),
    }
    for h, o in linears.items():
      yield hf + h + ".weight", ours + o + ("kernel",), _LINEAR
      yield hf + h + ".bias", ours + o + ("bias",), _SAME
    for norm in ("layernorm_before", "layernorm_after"):
      yield hf + norm + ".weight", ours + (norm, "scale"), _SAME
      yield hf + norm + ".bias", ours + (norm, "bias"), _SAME
  yield f"{prefix}layernorm.weight", e + ("layernorm", "scale"), _SAME
  yield f"{prefix}layernorm.bias", e + ("layernorm", "bias"), _SAME


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


def _entries(enc: ViTConfig, dec: GPT2Config, enc_prefix: str, dec_prefix: str,
             with_projection: bool):
  yield from _vit_entries(enc, enc_prefix)
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


def to_capjax(tensors: dict[str, np.ndarray], enc: ViTConfig, dec: GPT2Config,
              enc_prefix: str = "encoder.", dec_prefix: str = "decoder.transformer.",
              with_projection: bool | None = None, source: str = "checkpoint") -> dict:
  """HF tensors to a capjax pure parameter dict. Tensors the table does not
  name (a ViT pooler, GPT-2's attention-mask buffers, a tied LM head) are
  ignored; a missing or misshapen one is an error naming the tensor."""
  if with_projection is None:
    with_projection = enc.hidden_size != dec.n_embd
  out: dict = {}

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"{source}: no tensor {name!r}")
    return np.asarray(tensors[name], np.float32)

  for name, path, how in _entries(enc, dec, enc_prefix, dec_prefix, with_projection):
    if how in _FUSED:
      parts = _FUSED[how]
      w, b = take(name + ".weight"), take(name + ".bias")
      for k, part in enumerate(np.split(w, len(parts), axis=1)):
        _set(out, path + (parts[k], "kernel"), part)
      for k, part in enumerate(np.split(b, len(parts))):
        _set(out, path + (parts[k], "bias"), part)
    else:
      _set(out, path, how[0](take(name)))
  return out


def to_hf(params: dict, enc: ViTConfig, dec: GPT2Config) -> dict[str, np.ndarray]:
  """A capjax pure parameter dict to `VisionEncoderDecoderModel` tensors."""
  with_projection = "enc_to_dec_proj" in params and params["enc_to_dec_proj"] is not None
  out = {}
  for name, path, how in _entries(enc, dec, "encoder.", "decoder.transformer.", with_projection):
    if how in _FUSED:
      parts = _FUSED[how]
      out[name + ".weight"] = np.concatenate(
          [np.asarray(_get(params, path + (p, "kernel"))) for p in parts], axis=1)
      out[name + ".bias"] = np.concatenate(
          [np.asarray(_get(params, path + (p, "bias"))) for p in parts])
    else:
      out[name] = np.ascontiguousarray(how[1](np.asarray(_get(params, path))))
  out["decoder.lm_head.weight"] = out["decoder.transformer.wte.weight"]  # tied
  return out


def to_peft(params: dict, enc: ViTConfig, dec: GPT2Config) -> dict[str, tuple[np.ndarray,
                                                                             np.ndarray]]:
  """The LoRA adapters of a capjax pure parameter dict in `peft`'s layout:
  {module name as saved: (lora_A [rank, in], lora_B [out, rank])}. A fused
  GPT-2 projection (`c_attn`: query, key, value) holds its parts' adapters
  side by side, rank r for each part that has one, B zero across the outputs
  of the others: the same update, exactly."""
  with_projection = "enc_to_dec_proj" in params and params["enc_to_dec_proj"] is not None
  out = {}
  for name, path, how in _entries(enc, dec, "encoder.", "decoder.transformer.", with_projection):
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

