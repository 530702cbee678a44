"""Vision Transformer encoders, layer for layer Hugging Face's PyTorch models:
`ViTModel`, `DeiTModel`, `CLIPVisionModel`, `SiglipVisionModel`, `Dinov2Model`,
`Dinov2WithRegistersModel` and `BlipVisionModel`, named by `model_type` as in
their config.json.

They share one block (pre-norm attention and MLP) and differ where the
architectures do, as `Family` lists: the tokens before the patches, a bias
on the patch projection, CLIP's layer norm before the blocks, DINOv2's layer
scale, SwiGLU MLP and register tokens, and whether the last hidden state is
normalised. Field names follow the Hugging Face configs, so a `config.json`
fills `ViTConfig` directly. Poolers and heads are not built: an
encoder-decoder reads the last hidden state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.models.attention import attend, heads_first, split_heads
from trainer.models.layers import (FromDict, GatedMlp, Mlp, dense, dropout, fold, layer_keys,
                                   layer_norm, layer_stack, named, over_layers, remat_layer)


@dataclasses.dataclass(frozen=True)
class Family:
  """What sets one architecture apart."""
  tokens: tuple[str, ...] = ("cls_token",)  # before the patches, each with a position
  patch_bias: bool = True
  pre_layernorm: bool = False  # CLIP's `pre_layrnorm`, before the blocks
  # The last hidden state through `layernorm`. CLIP's is not: its
  # `post_layernorm` (kept as `layernorm`, for export) normalises only the
  # pooled output, which VisionEncoderDecoderModel does not read.
  final_norm: bool = True
  layer_scale: bool = False  # DINOv2: each branch scaled by a learnt vector
  mask_token: bool = False  # DINOv2's (masked image modelling; kept, not used)


FAMILIES = {
    "vit": Family(),
    "deit": Family(tokens=("cls_token", "distillation_token")),
    "clip_vision_model": Family(patch_bias=False, pre_layernorm=True, final_norm=False),
    "siglip_vision_model": Family(tokens=()),
    "dinov2": Family(layer_scale=True, mask_token=True),
    "dinov2_with_registers": Family(layer_scale=True, mask_token=True),
    # BLIP's: CLIP's layout (its fused qkv split on import) without the layer
    # norm before the blocks, and its post_layernorm on the last hidden state.
    "blip_vision_model": Family(),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig(FromDict):
  model_type: str = "vit"  # a key of FAMILIES
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072  # DINOv2 has none: hidden_size * mlp_ratio
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  # DINOv2
  mlp_ratio: int = 4
  use_swiglu_ffn: bool = False
  layerscale_value: float = 1.0
  use_mask_token: bool = True
  num_register_tokens: int = 0  # Dinov2WithRegistersModel's, after the class token

  def __post_init__(self):
    if self.model_type not in FAMILIES:
      raise ValueError(f"model.encoder.model_type: {self.model_type!r} is not one capjax "
                       f"builds ({', '.join(FAMILIES)})")

  @property
  def family(self) -> Family:
    return FAMILIES[self.model_type]

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden width, as each Hugging Face model computes it."""
    if not self.model_type.startswith("dinov2"):
      return self.intermediate_size
    width = int(self.hidden_size * self.mlp_ratio)
    # SwiGLU keeps two thirds of it, rounded up to a multiple of 8.
    return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width


class ViTAttention(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype, attention: str):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.attention = attention
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
    h = attend(q, k, v, None, self.probs_dropout, fold(key, 0), self.attention)
    return dropout(self.out(h, fold(key, 5)), self.out_dropout, fold(key, 1))


class ViTLayer(nnx.Module):

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype, attention: str):
    d = cfg.hidden_size
    self.layernorm_before = layer_norm(d, cfg.layer_norm_eps, rngs, dtype)
    self.attention = ViTAttention(cfg, rngs, dtype, attention)
    self.layernorm_after = layer_norm(d, cfg.layer_norm_eps, rngs, dtype)
    mlp = GatedMlp if cfg.use_swiglu_ffn else Mlp
    self.mlp = mlp(d, cfg.mlp_width, cfg.hidden_act, rngs, dtype,
                   dropout_rate=cfg.hidden_dropout_prob)
    if cfg.family.layer_scale:
      scale = named(nnx.initializers.constant(cfg.layerscale_value), "norm")
      self.layer_scale1 = nnx.Param(scale(rngs.params(), (d,)))
      self.layer_scale2 = nnx.Param(scale(rngs.params(), (d,)))
    else:
      self.layer_scale1 = self.layer_scale2 = None

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    h = self.attention(self.layernorm_before(x), fold(key, 0))
    if self.layer_scale1 is not None:
      h = h * self.layer_scale1[...].astype(h.dtype)
    x = x + h
    h = self.mlp(self.layernorm_after(x), fold(key, 1))
    if self.layer_scale2 is not None:
      h = h * self.layer_scale2[...].astype(h.dtype)
    return x + h


class ViT(nnx.Module):
  """Pixels [B, H, W, C] (already normalised) to hidden states [B, T + N, D]:
  the family's T tokens (class, distillation, registers), then the patches."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none",
               scan: bool = False, attention: str = "xla"):
    d, p, fam = cfg.hidden_size, cfg.patch_size, cfg.family
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan = scan
    self.patch_embed = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
        use_bias=fam.patch_bias, dtype=dtype, rngs=rngs,
        kernel_init=named(nnx.initializers.truncated_normal(0.02), None, None, None, "embed"),
        bias_init=named(nnx.initializers.zeros, "embed"))
    num_patches = (cfg.image_size // p) ** 2
    init = named(nnx.initializers.truncated_normal(0.02), None, None, "embed")
    for name in fam.tokens:
      setattr(self, name, nnx.Param(init(rngs.params(), (1, 1, d))))
    # DINOv2's registers follow the class token and have no position.
    self.register_tokens = (nnx.Param(init(rngs.params(), (1, cfg.num_register_tokens, d)))
                            if cfg.num_register_tokens else None)
    self.mask_token = (nnx.Param(named(nnx.initializers.zeros, "embed")(rngs.params(), (d,)))
                       if fam.mask_token and cfg.use_mask_token else None)
    self.position_embeddings = nnx.Param(
        init(rngs.params(), (1, len(fam.tokens) + num_patches, d)))
    self.pre_layernorm = (layer_norm(d, cfg.layer_norm_eps, rngs, dtype)
                          if fam.pre_layernorm else None)
    self.layers = layer_stack(lambda r: ViTLayer(cfg, r, dtype, attention),
                              cfg.num_hidden_layers, rngs, scan)
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
    out = x.reshape(b, h, w, p * p * c) @ kernel.reshape(p * p * c, -1)
    if self.patch_embed.bias is not None:
      out = out + self.patch_embed.bias[...].astype(self.dtype)
    return out

  def __call__(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key`: dropout (training); none without it."""
    x = self._embed_patches(pixels.astype(self.dtype))
    b, h, w, d = x.shape
    tokens = [jnp.broadcast_to(getattr(self, name)[...].astype(x.dtype), (b, 1, d))
              for name in self.cfg.family.tokens]
    x = jnp.concatenate(tokens + [x.reshape(b, h * w, d)], axis=1)
    x = x + self.position_embeddings[...].astype(x.dtype)
    if self.register_tokens is not None:
      regs = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype),
                              (b, self.cfg.num_register_tokens, d))
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
    x = dropout(x, self.cfg.hidden_dropout_prob, fold(key, 0))
    if self.pre_layernorm is not None:
      x = self.pre_layernorm(x)
    step = remat_layer(lambda layer, x, k: (layer(x, k), None), self.remat)
    keys = layer_keys(fold(key, 1), self.cfg.num_hidden_layers, self.scan)
    x, _ = over_layers(self.layers, step, x, keys, self.scan)
    return self.layernorm(x) if self.cfg.family.final_norm else x
