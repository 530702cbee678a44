"""Scaled dot-product attention and its backends (`model.attention`).

- "xla": the product written out, with its gradient written out too: the
  same products and softmax gradient as autodiff's, which XLA:CPU ran a third
  slower (ViT-B/16's attention: 47 ms a layer forward and backward, 35 ms).
  It has dropout on the attention probabilities.
- "dot_product": `jax.nn.dot_product_attention`. On an NVIDIA GPU, in
  bfloat16 or float16 with a head dimension that is a multiple of 8, it is
  cuDNN's fused (flash) kernel, which never writes the [L, L] scores to
  memory; elsewhere XLA's version of the same. It has no dropout: a layer
  that drops attention probabilities in training (GPT-2's `attn_pdrop`)
  computes with "xla" then.
- "splash": the Pallas splash-attention kernel of TPUs (in Pallas' interpreter
  elsewhere, as the tests run it). Its blocks want a head dimension and
  lengths in multiples of 128: ViT-B's and GPT-2's 64 and a ViT's 197
  tokens are padded with zeros (padded keys masked out), which adds work
  the kernel then does; decoding steps (a query or a few over the cache)
  compute with "xla". Not yet partitioned over a mesh: on several chips its
  operands are gathered to each, so it is for one-chip runs and trials.
- "auto" (the default): "dot_product" on GPUs, "xla" elsewhere.

Every backend computes the same function, softmax in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from trainer.models.layers import apply_dropout, dropout_mask

BACKENDS = ("auto", "xla", "dot_product", "splash")
BLOCK = 128  # the splash kernel's block: head dimension and lengths padded to it


def resolve(name: str, platform: str | None = None) -> str:
  """The backend `model.attention` names, "auto" made concrete for the platform."""
  if name not in BACKENDS:
    raise ValueError(f"model.attention: unknown {name!r} ({', '.join(BACKENDS)})")
  if name != "auto":
    return name
  return "dot_product" if (platform or jax.default_backend()) == "gpu" else "xla"


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, H*d] to [B, L, H, d]."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def heads_first(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, H*d] to [B, H, L, d]: the layout of keys and values (and of the
  KV cache), in which each head's scores are one contiguous matrix product.
  With keys in [B, L, H, d] the CPU spends most of a decode step transposing."""
  return split_heads(x, num_heads).transpose(0, 2, 1, 3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, causal_from: jax.Array | int | None = None,
           dropout_rate: float = 0.0, key: jax.Array | None = None,
           backend: str = "xla") -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  q: [N, Lq, H, d]; k, v: [B, H, Lk, d] with N a multiple of B: each group of
  N/B consecutive queries attends to one key set, so cross-attention keys are
  computed once per image and shared by its captions (or beams).
  causal_from: None, every query sees every key; else the position of the
  first query, and query i sees the keys up to `causal_from + i` (0 in
  training; the cache's index in decoding). Dropout on the attention
  probabilities when `key` is given. Returns [N, Lq, H*d].
  """
  n, lq, h, d = q.shape
  b = k.shape[0]
  g = n // b
  qg = q.reshape(b, g, lq, h, d).transpose(0, 3, 1, 2, 4).reshape(b, h, g * lq, d)
  dropping = key is not None and dropout_rate > 0.0
  square = isinstance(causal_from, int) and causal_from == 0 and g * lq == k.shape[2]
  if backend == "dot_product" and not dropping:
    out = _dot_product(qg, k, v, causal_from, lq)
  elif backend == "splash" and not dropping and (causal_from is None or square):
    out = _splash(qg, k, v, causal=causal_from is not None)
  else:
    allowed = None
    if causal_from is not None:
      visible = causal_from + jnp.arange(lq)
      allowed = jnp.tile(jnp.arange(k.shape[2])[None, :] <= visible[:, None], (g, 1))
    keep = dropout_mask(key, dropout_rate, (b, h, g * lq, k.shape[2])) if dropping else None
    out = _attention(qg, k, v, allowed, keep, dropout_rate)
  return out.reshape(b, h, g, lq, d).transpose(0, 2, 3, 1, 4).reshape(n, lq, h * d)


def _dot_product(qg: jax.Array, k: jax.Array, v: jax.Array, causal_from, lq: int) -> jax.Array:
  """`jax.nn.dot_product_attention` on [B, H, L, d] operands: cuDNN's kernel
  where it runs (a GPU, 16-bit operands, head dimension a multiple of 8), with
  the masks it takes (causal, or the keys' length), XLA's elsewhere."""
  b, _, lk, d = k.shape
  cudnn = (jax.default_backend() == "gpu" and qg.dtype in (jnp.bfloat16, jnp.float16)
           and d % 8 == 0)
  kw = {}
  if causal_from is None:
    pass
  elif isinstance(causal_from, int) and causal_from == 0 and qg.shape[2] == lk:
    kw["is_causal"] = True  # training: each caption's own keys, square
  elif lq == 1:  # a decoding step: the keys written so far
    kw["key_value_seq_lengths"] = jnp.full((b,), causal_from + 1, jnp.int32)
  else:  # several new queries over a cache: a mask only XLA's version takes
    visible = causal_from + jnp.arange(lq)
    kw["mask"] = jnp.tile(jnp.arange(lk)[None, :] <= visible[:, None], (qg.shape[2] // lq, 1))
    cudnn = False
  out = jax.nn.dot_product_attention(
      qg.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
      implementation="cudnn" if cudnn else None, **kw)
  return out.transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=None)
def _splash_kernel(causal: bool, lq: int, lk: int, heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel, splash_attention_mask as masks)
  mask = masks.CausalMask((lq, lk)) if causal else masks.FullMask((lq, lk))
  with jax.ensure_compile_time_eval():  # its mask arrays concrete, not one trace's
    return kernel.make_splash_mha(masks.MultiHeadMask([mask] * heads), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash(qg: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """The splash kernel on [B, H, L, d] operands, padded to its blocks: the
  head dimension with zeros (the same products), the keys with ones it is
  told to ignore (a segment of their own), the queries with rows whose
  output is dropped."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  _, h, lq, d = qg.shape
  lk = k.shape[2]
  up = lambda n: -(-n // BLOCK) * BLOCK
  pq, pk, pd = up(lq), up(lk), up(d)
  pad = lambda x, rows: jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, pd - d)))
  q = pad(qg * jnp.asarray(1 / math.sqrt(d), qg.dtype), pq)  # the kernel does not scale
  k, v = pad(k, pk), pad(v, pk)
  segments = splash_attention_kernel.SegmentIds(
      q=jnp.zeros((pq,), jnp.int32), kv=(jnp.arange(pk) >= lk).astype(jnp.int32))
  kernel = _splash_kernel(causal, pq, pk, h, jax.default_backend() != "tpu")
  out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)
  return out[:, :, :lq, :d].astype(qg.dtype)


# "xla": softmax(q k^T / sqrt(d)) v with q, k, v [B, H, L, d], `allowed`
# [Lq, Lk] (or None) and dropout's `keep` mask (or None), its gradient
# written out (see the module's docstring).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, allowed, keep, rate):
  return _attention_fwd(q, k, v, allowed, keep, rate)[0]


def _attention_fwd(q, k, v, allowed, keep, rate):
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bhkd->bhqd", apply_dropout(p, keep, rate).astype(v.dtype), v)
  return out, (q, k, v, p, keep)


def _attention_bwd(rate, res, g):
  q, k, v, p, keep = res
  dv = jnp.einsum("bhqk,bhqd->bhkd", apply_dropout(p, keep, rate).astype(v.dtype), g)
  dp = apply_dropout(jnp.einsum("bhqd,bhkd->bhqk", g, v).astype(jnp.float32), keep, rate)
  # softmax's gradient; masked keys have p = 0, so none flows to them.
  ds = (p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(q.shape[-1])).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q).astype(k.dtype)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


