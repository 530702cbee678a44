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

from trainer.models.layers import (FromDict, Mlp, attend, dense, layer_norm, named, normal,
                                   remat_layer, split_heads)

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
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  pad_token_id: int | None = None


class _Attention(nnx.Module):
  """Query, key, value and output projections."""

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs, dtype):
    d = cfg.n_embd
    self.num_heads = cfg.n_head
    out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    self.query = dense(d, d, ("embed", "heads"), rngs, dtype)
    self.key = dense(d, d, ("embed", "heads"), rngs, dtype)
    self.value = dense(d, d, ("embed", "heads"), rngs, dtype)
    self.out = dense(d, d, ("heads", "embed"), rngs, dtype, stddev=out_std)


class SelfAttention(_Attention):

  def __call__(self, x: jax.Array, cache: KV | None, index: jax.Array | None
               ) -> tuple[jax.Array, KV | None]:
    q, k, v = (split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
    lq = x.shape[1]
    if cache is None:
      mask = jnp.tril(jnp.ones((lq, lq), bool))
    else:
      # Write this step's keys and values at `index`; attend to all up to it.
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
      cache = (k, v)
      key_pos = jnp.arange(k.shape[1])
      query_pos = index + jnp.arange(lq)
      mask = key_pos[None, :] <= query_pos[:, None]
    return self.out(attend(q, k, v, mask)), cache


class CrossAttention(_Attention):

  def kv(self, encoder_hidden: jax.Array) -> KV:
    return (split_heads(self.key(encoder_hidden), self.num_heads),
            split_heads(self.value(encoder_hidden), self.num_heads))

  def __call__(self, x: jax.Array, kv: KV) -> jax.Array:
    q = split_heads(self.query(x), self.num_heads)
    return self.out(attend(q, kv[0], kv[1], None))


class Block(nnx.Module):

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs, dtype):
    d, eps = cfg.n_embd, cfg.layer_norm_epsilon
    self.ln_1 = layer_norm(d, eps, rngs, dtype)
    self.attn = SelfAttention(cfg, rngs, dtype)
    self.ln_cross_attn = layer_norm(d, eps, rngs, dtype)
    self.crossattention = CrossAttention(cfg, rngs, dtype)
    self.ln_2 = layer_norm(d, eps, rngs, dtype)
    self.mlp = Mlp(d, cfg.n_inner or 4 * d, cfg.activation_function, rngs, dtype,
                   out_stddev=0.02 / math.sqrt(2 * cfg.n_layer))

  def __call__(self, x, cross_kv: KV, cache: KV | None, index):
    h, cache = self.attn(self.ln_1(x), cache, index)
    x = x + h
    x = x + self.crossattention(self.ln_cross_attn(x), cross_kv)
    x = x + self.mlp(self.ln_2(x))
    return x, cache


class GPT2(nnx.Module):
  """Token ids [N, L] and per-layer cross K/V to logits [N, L, vocab].

  The language-model head is tied to the token embedding, as in GPT-2.
  """

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs, dtype=jnp.float32, remat: str = "none"):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, rngs=rngs,
                         embedding_init=named(normal(), "vocab", "embed"))
    self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, rngs=rngs,
                         embedding_init=named(normal(0.01), None, "embed"))
    self.h = nnx.List([Block(cfg, rngs, dtype) for _ in range(cfg.n_layer)])
    self.ln_f = layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, rngs, dtype)

  def cross_kv(self, encoder_hidden: jax.Array) -> list[KV]:
    """Cross-attention keys and values of every layer, once per image."""
    return [block.crossattention.kv(encoder_hidden) for block in self.h]

  def init_cache(self, batch: int, max_length: int) -> list[KV]:
    shape = (batch, max_length, self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head)
    return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.h]

  def __call__(self, input_ids: jax.Array, cross_kv: list[KV],
               cache: list[KV] | None = None, index: jax.Array | int = 0
               ) -> tuple[jax.Array, list[KV] | None]:
    positions = index + jnp.arange(input_ids.shape[1])
    x = self.wte(input_ids) + self.wpe(positions)[None]
    if cache is None:  # training: no cache, layers rematerialised as configured
      step = remat_layer(lambda block, h, kv: block(h, kv, None, 0)[0], self.remat)
      for i, block in enumerate(self.h):
        x = step(block, x, cross_kv[i])
      new_cache = None
    else:
      new_cache = []
      for i, block in enumerate(self.h):
        x, c = block(x, cross_kv[i], cache[i], index)
        new_cache.append(c)
    x = self.ln_f(x)
    logits = self.wte.attend(x).astype(jnp.float32)
    return logits, new_cache
