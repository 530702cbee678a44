"""Vision Transformer encoder, layer for layer Hugging Face's `ViTModel`.

Field names follow `transformers.ViTConfig`, so a Hugging Face `config.json`
fills `ViTConfig` directly. The pooler is not built: an encoder-decoder reads
the last hidden state (after the final layer norm).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.models.layers import (FromDict, Mlp, attend, dense, dropout, fold, heads_first,
                                   layer_keys, layer_norm, layer_stack, named, over_layers,
                                   remat_layer, split_heads)


@dataclasses.dataclass(frozen=True)
class ViTConfig(FromDict):
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0


class ViTAttention(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.query = dense(d, d, ("embed", "heads"), rngs, dtype, use_bias=cfg.qkv_bias)
    self.key = dense(d, d, ("embed", "heads"), rngs, dtype, use_bias=cfg.qkv_bias)
    self.value = dense(d, d, ("embed", "heads"), rngs, dtype, use_bias=cfg.qkv_bias)
    self.out = dense(d, d, ("heads", "embed"), rngs, dtype)
    self.probs_dropout = cfg.attention_probs_dropout_prob
    self.out_dropout = cfg.hidden_dropout_prob

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    q = split_heads(self.query(x, fold(key, 2)), self.num_heads)
    k = heads_first(self.key(x, fold(key, 3)), self.num_heads)
    v = heads_first(self.value(x, fold(key, 4)), self.num_heads)
    h = attend(q, k, v, None, self.probs_dropout, fold(key, 0))
    return dropout(self.out(h, fold(key, 5)), self.out_dropout, fold(key, 1))


class ViTLayer(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype):
    self.layernorm_before = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, dtype)
    self.attention = ViTAttention(cfg, rngs, dtype)
    self.layernorm_after = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, dtype)
    self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs, dtype,
                   dropout_rate=cfg.hidden_dropout_prob)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    x = x + self.attention(self.layernorm_before(x), fold(key, 0))
    return x + self.mlp(self.layernorm_after(x), fold(key, 1))


class ViT(nnx.Module):
  """Pixels [B, H, W, C] (already normalised) to hidden states [B, 1 + N, D]."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none",
               scan: bool = False):
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan = scan
    self.patch_embed = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
        dtype=dtype, rngs=rngs,
        kernel_init=named(nnx.initializers.truncated_normal(0.02), None, None, None, "embed"),
        bias_init=named(nnx.initializers.zeros, "embed"))
    num_patches = (cfg.image_size // p) ** 2
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(named(init, None, None, "embed")(rngs.params(), (1, 1, d)))
    self.position_embeddings = nnx.Param(
        named(init, None, None, "embed")(rngs.params(), (1, num_patches + 1, d)))
    self.layers = layer_stack(lambda r: ViTLayer(cfg, r, dtype), cfg.num_hidden_layers, rngs,
                              scan)
    self.layernorm = layer_norm(d, cfg.layer_norm_eps, rngs, dtype)

  def _embed_patches(self, x: jax.Array) -> jax.Array:
    """`patch_embed`'s convolution (stride = kernel, no padding) as one
    matrix product over the flattened patches: the same sums, and on the CPU
    its gradient takes a seventh of the time XLA's convolution takes."""
    p = self.cfg.patch_size
    b, h, w, c = x.shape
    h, w = h // p, w // p
    x = x[:, :h * p, :w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    kernel = self.patch_embed.kernel[...].astype(self.dtype)  # [p, p, c, D]
    return (x.reshape(b, h, w, p * p * c) @ kernel.reshape(p * p * c, -1)
            + self.patch_embed.bias[...].astype(self.dtype))

  def __call__(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key`: dropout (training); none without it."""
    x = self._embed_patches(pixels.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)
    x = dropout(x, self.cfg.hidden_dropout_prob, fold(key, 0))
    step = remat_layer(lambda layer, x, k: (layer(x, k), None), self.remat)
    keys = layer_keys(fold(key, 1), self.cfg.num_hidden_layers, self.scan)
    x, _ = over_layers(self.layers, step, x, keys, self.scan)
    return self.layernorm(x)
