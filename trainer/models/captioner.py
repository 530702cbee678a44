"""The captioner: a ViT encoder and a text decoder, as Hugging Face's
`VisionEncoderDecoderModel` composes GPT-2 with one, or as
`BlipForConditionalGeneration` composes BLIP's (`model.decoder.model_type`:
"gpt2", the default, or "blip_text_model").

Images arrive as uint8 and are normalised here, on the device. The decoder
reads [B, G, L] token ids: G captions (or beams) per image, so the encoder and
the cross-attention keys run once per image, not once per caption.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from trainer.models.blip_text import BlipText, BlipTextConfig
from trainer.models.gpt2 import GPT2, GPT2Config
from trainer.models import attention as attention_lib, lora
from trainer.models.layers import dense, fold
from trainer.models.vit import ViT, ViTConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DECODERS = {"gpt2": (GPT2Config, GPT2), "blip_text_model": (BlipTextConfig, BlipText)}


def decoder_config(decoder_cfg: ConfigDict | dict) -> GPT2Config | BlipTextConfig:
  """`model.decoder` as its architecture's config."""
  d = decoder_cfg.to_dict() if isinstance(decoder_cfg, ConfigDict) else dict(decoder_cfg)
  kind = d.get("model_type", "gpt2")
  if kind not in DECODERS:
    raise ValueError(f"model.decoder.model_type: {kind!r} is not one capjax builds "
                     f"({', '.join(DECODERS)})")
  return DECODERS[kind][0].from_dict(d)


class Captioner(nnx.Module):

  def __init__(self, encoder: ViTConfig, decoder: GPT2Config | BlipTextConfig,
               image_mean: Sequence[float],
               image_std: Sequence[float], rngs: nnx.Rngs, dtype=jnp.float32,
               remat: str = "none", scan: bool = False, attention: str = "auto"):
    backend = attention_lib.resolve(attention)
    self.encoder = ViT(encoder, rngs, dtype, remat, scan, backend)
    blip = isinstance(decoder, BlipTextConfig)
    if blip and decoder.encoder_hidden_size != encoder.hidden_size:
      raise ValueError(f"model.decoder.encoder_hidden_size={decoder.encoder_hidden_size} "
                       f"is not the encoder's hidden_size {encoder.hidden_size}")
    # BLIP's cross-attention reads the image tokens in their own width.
    width = encoder.hidden_size if blip else decoder.n_embd
    self.decoder = (BlipText if blip else GPT2)(decoder, rngs, dtype, remat, scan, backend)
    # As in VisionEncoderDecoderModel: a projection only when the widths differ.
    self.enc_to_dec_proj = (dense(encoder.hidden_size, width, (None, "embed"), rngs, dtype)
                            if encoder.hidden_size != width else None)
    self.image_mean = tuple(float(m) for m in image_mean)
    self.image_std = tuple(float(s) for s in image_std)

  def encode(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """uint8 [B, H, W, C] to encoder states in the decoder's width [B, P, D]."""
    mean = jnp.asarray(self.image_mean, jnp.float32)
    std = jnp.asarray(self.image_std, jnp.float32)
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    h = self.encoder(x, key)
    return self.enc_to_dec_proj(h, fold(key, 2)) if self.enc_to_dec_proj is not None else h

  def cross_kv(self, images: jax.Array, key: jax.Array | None = None):
    return self.decoder.cross_kv(self.encode(images, key), fold(key, 3))

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               key: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, C] uint8, input_ids [B, G, L] -> logits [B, G, L, V].
    `key`: dropout (training); none without it."""
    b, g, l = input_ids.shape
    enc_key, dec_key = (None, None) if key is None else jax.random.split(key)
    logits, _ = self.decoder(input_ids.reshape(b * g, l), self.cross_kv(images, enc_key),
                             key=dec_key)
    return logits.reshape(b, g, l, -1)


def build_captioner(model_cfg: ConfigDict, seed: int = 0) -> Captioner:
  """Builds a captioner from the config's `model` section, with LoRA
  adapters where `model.lora.rank` > 0."""
  model = Captioner(
      ViTConfig.from_dict(model_cfg.encoder.to_dict()),
      decoder_config(model_cfg.decoder),
      model_cfg.image_mean, model_cfg.image_std,
      rngs=nnx.Rngs(seed), dtype=DTYPES[model_cfg.dtype], remat=model_cfg.remat,
      scan=model_cfg.scan_layers, attention=model_cfg.get("attention", "auto"))
  spec = lora.Spec.of(model_cfg)
  if spec is not None:
    lora.add_adapters(model, spec, seed)
  return model
