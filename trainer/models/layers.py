"""Building blocks shared by the encoder and the decoder.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`,
`norm`, ...); `trainer.sharding` maps them onto mesh axes with the config's
rule table. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class FromDict:
  """For config dataclasses: build from a dict (e.g. a Hugging Face
  `config.json`), ignoring the keys the dataclass does not have."""

  @classmethod
  def from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# Activation rematerialisation: what the backward pass may keep from the
# forward pass of each layer ("none": everything, no recomputation).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(fn: Callable, remat: str) -> Callable:
  """`fn(layer, *args)`, rematerialised by the named policy (or as it is)."""
  if remat == "none":
    return fn
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat: unknown {remat!r} (none, {', '.join(REMAT_POLICIES)})")
  return nnx.remat(fn, policy=REMAT_POLICIES[remat])


def named(init: Callable, *names: str | None) -> Callable:
  """An initializer whose parameter carries logical axis names."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def normal(stddev: float = 0.02) -> Callable:
  return nnx.initializers.normal(stddev)


def dense(features_in: int, features_out: int, names: tuple[str | None, str | None],
          rngs: nnx.Rngs, dtype, stddev: float = 0.02, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=dtype,
                    kernel_init=named(normal(stddev), *names),
                    bias_init=named(nnx.initializers.zeros, names[1]), rngs=rngs)


def layer_norm(features: int, eps: float, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype,
                       scale_init=named(nnx.initializers.ones, "norm"),
                       bias_init=named(nnx.initializers.zeros, "norm"), rngs=rngs)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  q: [N, Lq, H, d]; k, v: [B, Lk, H, d] with N a multiple of B: each group of
  N/B consecutive queries attends to one key set, so cross-attention keys are
  computed once per image and shared by its captions (or beams).
  mask: broadcastable to [N, H, Lq, Lk], True where attention is allowed.
  Returns [N, Lq, H*d].
  """
  n, lq, h, d = q.shape
  b = k.shape[0]
  qg = q.reshape(b, n // b, lq, h, d)
  scores = jnp.einsum("bgqhd,bkhd->bghqk", qg, k).astype(jnp.float32)
  scores = scores.reshape(n, h, lq, k.shape[1]) / math.sqrt(d)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  probs = probs.reshape(b, n // b, h, lq, k.shape[1])
  out = jnp.einsum("bghqk,bkhd->bgqhd", probs, v)
  return out.reshape(n, lq, h * d)


class Mlp(nnx.Module):
  """Two dense layers with an activation between them."""

  def __init__(self, dim: int, hidden: int, activation: str, rngs: nnx.Rngs, dtype,
               out_stddev: float = 0.02):
    self.fc = dense(dim, hidden, ("embed", "mlp"), rngs, dtype)
    self.proj = dense(hidden, dim, ("mlp", "embed"), rngs, dtype, stddev=out_stddev)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(ACTIVATIONS[self.activation](self.fc(x)))
