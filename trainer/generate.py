"""Caption generation: greedy decoding with a preallocated KV cache.

The encoder and the cross-attention keys run once per image; the decode is
one `lax.while_loop` that stops as soon as every sequence has produced EOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.models.captioner import Captioner


def greedy(model: Captioner, images: jax.Array, max_length: int, bos: int, eos: int,
           pad: int) -> jax.Array:
  """images [B, H, W, C] uint8 -> token ids [B, max_length], padded after EOS."""
  b = images.shape[0]
  cross = model.cross_kv(images)
  cache = model.decoder.init_cache(b, max_length)
  tokens = jnp.full((b, max_length), pad, jnp.int32)
  state = (jnp.int32(0), jnp.full((b,), bos, jnp.int32), tokens,
           jnp.zeros((b,), bool), cache)

  def cond(s):
    i, _, _, done, _ = s
    return (i < max_length) & ~jnp.all(done)

  def body(s):
    i, last, tokens, done, cache = s
    logits, cache = model.decoder(last[:, None], cross, cache, i)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, 1)
    return i + 1, nxt, tokens, done | (nxt == eos), cache

  return jax.lax.while_loop(cond, body, state)[2]


def make_generate_fn(graphdef: nnx.GraphDef, max_length: int, bos: int, eos: int, pad: int,
                     param_shardings=None, batch_sharding=None):
  """A jitted (params, images) -> token ids, sharded over the batch axes."""

  def fn(params, images):
    return greedy(nnx.merge(graphdef, params), images, max_length, bos, eos, pad)

  if batch_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def decode_text(tok, ids, eos: int) -> list[str]:
  """Token ids to caption strings, cut at the first EOS."""
  out = []
  for row in ids.tolist():
    if eos in row:
      row = row[:row.index(eos)]
    out.append(tok.decode(row, skip_special_tokens=True).strip())
  return out
