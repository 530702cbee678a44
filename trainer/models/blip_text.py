"""BLIP's text decoder, layer for layer Hugging Face's `BlipTextLMHeadModel`:
a BERT with post-norm layers (causal self-attention, cross-attention to the
image tokens, MLP, each added to its input and then normalised), word and
absolute position embeddings normalised before the first layer, and BERT's
prediction head (dense, activation, layer norm, then the word embeddings,
tied, with a bias of their own).

Field names follow `transformers.BlipTextConfig`. It takes the same calls as
`trainer.models.gpt2.GPT2` (cross K/V once per image, a preallocated cache),
so training, decoding and the sharding rules need nothing else. Captions
start from `bos_token_id` ("[DEC]") and end at `sep_token_id` ("[SEP]"),
which the captioner's config keeps as its `eos_token_id`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.models.gpt2 import KV, CrossAttention, CrossDecoder, SelfAttention
from trainer.models.layers import (ACTIVATIONS, FromDict, Mlp, dense, dropout, fold, layer_norm,
                                   layer_stack, named, normal)

MODEL_TYPE = "blip_text_model"


@dataclasses.dataclass(frozen=True)
class BlipTextConfig(FromDict):
  model_type: str = MODEL_TYPE
  vocab_size: int = 30524
  hidden_size: int = 768
  encoder_hidden_size: int = 768  # the image tokens' width: cross-attention's keys and values
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 512
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  bos_token_id: int = 30522  # [DEC]
  eos_token_id: int = 102  # where a caption ends: the checkpoint's sep_token_id
  pad_token_id: int = 0
  sep_token_id: int = 102


class BlipTextLayer(nnx.Module):

  def __init__(self, cfg: BlipTextConfig, rngs: nnx.Rngs, dtype, attention: str):
    d, eps = cfg.hidden_size, cfg.layer_norm_eps
    drops = (cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob)
    self.attention = SelfAttention(d, cfg.num_attention_heads, rngs, dtype, attention, *drops)
    self.attention_norm = layer_norm(d, eps, rngs, dtype)
    self.crossattention = CrossAttention(d, cfg.num_attention_heads, rngs, dtype, attention,
                                         *drops, kv_dim=cfg.encoder_hidden_size)
    self.crossattention_norm = layer_norm(d, eps, rngs, dtype)
    self.mlp = Mlp(d, cfg.intermediate_size, cfg.hidden_act, rngs, dtype,
                   dropout_rate=cfg.hidden_dropout_prob)
    self.mlp_norm = layer_norm(d, eps, rngs, dtype)

  def __call__(self, x, cross_kv: KV, cache: KV | None, index, key=None):
    h, cache = self.attention(x, cache, index, fold(key, 0))
    x = self.attention_norm(x + h)
    x = self.crossattention_norm(x + self.crossattention(x, cross_kv, fold(key, 1)))
    x = self.mlp_norm(x + self.mlp(x, fold(key, 2)))
    return x, cache


class BlipText(CrossDecoder):
  """Token ids [N, L] and per-layer cross K/V to logits [N, L, vocab]."""

  def __init__(self, cfg: BlipTextConfig, rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none",
               scan: bool = False, attention: str = "xla"):
    d = cfg.hidden_size
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan = scan
    self.num_layers, self.num_heads, self.width = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    self.word_embeddings = nnx.Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs,
                                     embedding_init=named(normal(), "vocab", "embed"))
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, dtype=dtype, rngs=rngs,
                                         embedding_init=named(normal(), None, "embed"))
    self.embed_norm = layer_norm(d, cfg.layer_norm_eps, rngs, dtype)
    self.layers = layer_stack(lambda r: BlipTextLayer(cfg, r, dtype, attention),
                              cfg.num_hidden_layers, rngs, scan)
    self.head_dense = dense(d, d, (None, "embed"), rngs, dtype)
    self.head_norm = layer_norm(d, cfg.layer_norm_eps, rngs, dtype)
    self.head_bias = nnx.Param(named(nnx.initializers.zeros, "vocab")(rngs.params(),
                                                                      (cfg.vocab_size,)))

  @property
  def stack(self):
    return self.layers

  def __call__(self, input_ids: jax.Array, cross_kv, cache=None, index: jax.Array | int = 0,
               key: jax.Array | None = None):
    """Logits and the updated cache (None without one). `key`: dropout."""
    positions = index + jnp.arange(input_ids.shape[1])
    x = self.embed_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])
    x = dropout(x, self.cfg.hidden_dropout_prob, fold(key, 0))
    x, new_cache = self.run_layers(x, cross_kv, cache, index, fold(key, 1))
    h = self.head_norm(ACTIVATIONS[self.cfg.hidden_act](self.head_dense(x, fold(key, 2))))
    logits = self.word_embeddings.attend(h) + self.head_bias[...].astype(h.dtype)
    return logits.astype(jnp.float32), new_cache
