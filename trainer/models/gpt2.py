"""GPT-2 decoder with cross-attention, layer for layer Hugging Face's
`GPT2LMHeadModel(add_cross_attention=True)`.

Field names follow `transformers.GPT2Config`. The fused `c_attn` projection is
kept as separate query, key and value projections, so that tensor parallelism
splits heads, not the fused matrix; the importer splits it.

Decoding uses a preallocated self-attention cache (`init_cache`) and
cross-attention keys and values computed once per image (`cross_kv`) and shared
by that image's captions or beams.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.models.attention import attend, heads_first, split_heads
from trainer.models.layers import (FromDict, Mlp, dense, dropout, fold, layer_keys, layer_norm,
                                   layer_stack, named, normal, over_layers, remat_layer)

KV = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class GPT2Config(FromDict):
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  pad_token_id: int | None = None


class _Attention(nnx.Module):
  """Query, key, value and output projections: width `d` and `heads` heads,
  keys and values from inputs of width `kv_dim` (`d` unless given)."""

  def __init__(self, d: int, heads: int, rngs: nnx.Rngs, dtype, attention: str,
               attn_pdrop: float, resid_pdrop: float, out_std: float = 0.02,
               kv_dim: int | None = None):
    kv_dim = kv_dim or d
    self.num_heads = heads
    self.attention = attention
    self.query = dense(d, d, ("embed", "heads"), rngs, dtype)
    self.key = dense(kv_dim, d, ("embed", "heads"), rngs, dtype)
    self.value = dense(kv_dim, d, ("embed", "heads"), rngs, dtype)
    self.out = dense(d, d, ("heads", "embed"), rngs, dtype, stddev=out_std)
    self.attn_pdrop = attn_pdrop
    self.resid_pdrop = resid_pdrop

  def _attend(self, x: jax.Array, k: jax.Array, v: jax.Array, causal_from, key) -> jax.Array:
    q = split_heads(self.query(x, fold(key, 2)), self.num_heads)
    h = attend(q, k, v, causal_from, self.attn_pdrop, fold(key, 0), self.attention)
    return dropout(self.out(h, fold(key, 3)), self.resid_pdrop, fold(key, 1))

  def _kv(self, x: jax.Array, key: jax.Array | None) -> KV:
    return (heads_first(self.key(x, fold(key, 4)), self.num_heads),
            heads_first(self.value(x, fold(key, 5)), self.num_heads))


class SelfAttention(_Attention):

  def __call__(self, x: jax.Array, cache: KV | None, index: jax.Array | int,
               key: jax.Array | None) -> tuple[jax.Array, KV | None]:
    k, v = self._kv(x, key)
    if cache is None:
      return self._attend(x, k, v, 0, key), None
    # Write this step's keys and values at `index`; attend to all up to it.
    k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 2)
    v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 2)
    return self._attend(x, k, v, index, key), (k, v)


class CrossAttention(_Attention):

  def kv(self, encoder_hidden: jax.Array, key: jax.Array | None = None) -> KV:
    return self._kv(encoder_hidden, key)

  def __call__(self, x: jax.Array, kv: KV, key: jax.Array | None) -> jax.Array:
    return self._attend(x, kv[0], kv[1], None, key)


class Block(nnx.Module):

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs, dtype, attention: str):
    d, eps = cfg.n_embd, cfg.layer_norm_epsilon
    self.ln_1 = layer_norm(d, eps, rngs, dtype)
    drops = (cfg.attn_pdrop, cfg.resid_pdrop, 0.02 / math.sqrt(2 * cfg.n_layer))
    self.attn = SelfAttention(d, cfg.n_head, rngs, dtype, attention, *drops)
    self.ln_cross_attn = layer_norm(d, eps, rngs, dtype)
    self.crossattention = CrossAttention(d, cfg.n_head, rngs, dtype, attention, *drops)
    self.ln_2 = layer_norm(d, eps, rngs, dtype)
    self.mlp = Mlp(d, cfg.n_inner or 4 * d, cfg.activation_function, rngs, dtype,
                   out_stddev=0.02 / math.sqrt(2 * cfg.n_layer), dropout_rate=cfg.resid_pdrop)

  def __call__(self, x, cross_kv: KV, cache: KV | None, index, key=None):
    h, cache = self.attn(self.ln_1(x), cache, index, fold(key, 0))
    x = x + h
    x = x + self.crossattention(self.ln_cross_attn(x), cross_kv, fold(key, 1))
    x = x + self.mlp(self.ln_2(x), fold(key, 2))
    return x, cache


class CrossDecoder(nnx.Module):
  """What GPT-2 and BLIP's text decoder share: a stack of layers
  `layer(x, cross_kv, cache, index, key) -> (x, cache)`, each with a
  `crossattention`, their cross K/V once per image, and the cache.
  Subclasses give `stack` (the layers), `num_layers`, `num_heads` and `width`."""

  def cross_kv(self, encoder_hidden: jax.Array, key: jax.Array | None = None):
    """Cross-attention keys and values of every layer, once per image.
    `key`: dropout in LoRA adapters (training)."""
    return over_layers(self.stack, lambda layer, h, k: (h, layer.crossattention.kv(h, k)),
                       encoder_hidden, layer_keys(key, self.num_layers, self.scan),
                       self.scan)[1]

  def init_cache(self, batch: int, max_length: int):
    shape = (batch, self.num_heads, max_length, self.width // self.num_heads)
    if self.scan:
      shape = (self.num_layers,) + shape
      return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
    return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in range(self.num_layers)]

  def reorder_cache(self, cache, index: jax.Array):
    """The cache's rows (sequences) picked by `index`, as beam search moves them."""
    return jax.tree.map(lambda c: jnp.take(c, index, axis=1 if self.scan else 0), cache)

  def run_layers(self, x: jax.Array, cross_kv, cache, index, key: jax.Array | None):
    """The hidden states through the stack, and the updated cache (None without one)."""
    keys = layer_keys(key, self.num_layers, self.scan)
    if cache is None:  # training: no cache, layers rematerialised as configured
      step = remat_layer(lambda layer, h, kv_key: (layer(h, kv_key[0], None, 0, kv_key[1])[0],
                                                   None), self.remat)
      per_layer = (cross_kv, keys) if self.scan else list(zip(cross_kv, keys))
      return over_layers(self.stack, step, x, per_layer, self.scan)[0], None
    per_layer = (cross_kv, cache) if self.scan else list(zip(cross_kv, cache))
    return over_layers(self.stack, lambda layer, h, kc: layer(h, kc[0], kc[1], index), x,
                       per_layer, self.scan)


class GPT2(CrossDecoder):
  """Token ids [N, L] and per-layer cross K/V to logits [N, L, vocab].

  The language-model head is tied to the token embedding, as in GPT-2.
  Per-layer values (cross K/V, the cache) are lists with one entry a layer,
  or with `scan` arrays with a leading layer axis.
  """

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none",
               scan: bool = False, attention: str = "xla"):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan = scan
    self.num_layers, self.num_heads, self.width = cfg.n_layer, cfg.n_head, cfg.n_embd
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, rngs=rngs,
                         embedding_init=named(normal(), "vocab", "embed"))
    self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, rngs=rngs,
                         embedding_init=named(normal(0.01), None, "embed"))
    self.h = layer_stack(lambda r: Block(cfg, r, dtype, attention), cfg.n_layer, rngs, scan)
    self.ln_f = layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, rngs, dtype)

  @property
  def stack(self):
    return self.h

  def __call__(self, input_ids: jax.Array, cross_kv, cache=None, index: jax.Array | int = 0,
               key: jax.Array | None = None):
    """Logits and the updated cache (None without one). `key`: dropout
    (training); none without it."""
    positions = index + jnp.arange(input_ids.shape[1])
    x = self.wte(input_ids) + self.wpe(positions)[None]
    x = dropout(x, self.cfg.embd_pdrop, fold(key, 0))
    x, new_cache = self.run_layers(x, cross_kv, cache, index, fold(key, 1))
    x = self.ln_f(x)
    logits = self.wte.attend(x).astype(jnp.float32)
    return logits, new_cache
