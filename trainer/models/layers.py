"""Building blocks shared by the encoder and the decoder.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`,
`norm`, ...); `trainer.sharding` maps them onto mesh axes with the config's
rule table. Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """jax.nn.gelu, whose gradient keeps only its input for the backward pass:
  autodiff kept four more tensors of the MLP's width (half the MLP's
  activation memory) and the backward pass ran a tenth slower for them."""
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
  return gelu(x, approximate), x


def _gelu_bwd(approximate, x, g):
  xf = x.astype(jnp.float32)
  if approximate:  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
    c = math.sqrt(2 / math.pi)
    t = jnp.tanh(c * (xf + 0.044715 * xf ** 3))
    d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * c * (1 + 3 * 0.044715 * xf * xf)
  else:  # x Phi(x)
    d = (0.5 * (1 + jax.lax.erf(xf / math.sqrt(2)))
         + xf * jnp.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi))
  return ((g * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: gelu(x, False),
    "gelu_new": lambda x: gelu(x, True),
    "gelu_pytorch_tanh": lambda x: gelu(x, True),
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


class Dense(nnx.Linear):
  """A linear layer that may carry a LoRA adapter (`trainer.models.lora`):
  y = x W + b + scale * dropout(x) A B, with A [in, r] and B [r, out]."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.lora_a = None
    self.lora_b = None
    self.lora_scale = 0.0
    self.lora_dropout = 0.0

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`key`: dropout on the adapter's input (training); none without it."""
    y = super().__call__(x)
    if self.lora_a is None:
      return y
    # On rows [N, in], the scale on the rank-r intermediate: with the batch
    # and length axes kept apart, these narrow products' backward pass took
    # four times as long on the CPU (a ViT-B/16 + GPT-2 LoRA step: 7.5 s, 5.6 s).
    h = dropout(x, self.lora_dropout, key).astype(y.dtype).reshape(-1, x.shape[-1])
    a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
    return y + (((h @ a) * jnp.asarray(self.lora_scale, y.dtype)) @ b).reshape(y.shape)


def dense(features_in: int, features_out: int, names: tuple[str | None, str | None],
          rngs: nnx.Rngs, dtype, stddev: float = 0.02, use_bias: bool = True) -> Dense:
  return Dense(features_in, features_out, use_bias=use_bias, dtype=dtype,
               kernel_init=named(normal(stddev), *names),
               bias_init=named(nnx.initializers.zeros, names[1]), rngs=rngs)


def layer_norm(features: int, eps: float, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype,
                       scale_init=named(nnx.initializers.ones, "norm"),
                       bias_init=named(nnx.initializers.zeros, "norm"), rngs=rngs)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity without a key (evaluation) or at rate 0."""
  if key is None or rate == 0.0:
    return x
  return apply_dropout(x, dropout_mask(key, rate, x.shape), rate).astype(x.dtype)


def dropout_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Dropout's mask: True for the elements kept."""
  return jax.random.bernoulli(key, 1.0 - rate, shape)


def apply_dropout(x: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
  """`x` through a drawn mask (none: unchanged), scaled by 1 / (1 - rate)."""
  return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0)


def layer_keys(key: jax.Array | None, n: int, scan: bool):
  """Per-layer dropout keys, in the form `over_layers` takes."""
  if key is None:
    return None if scan else [None] * n
  keys = jax.random.split(key, n)
  return keys if scan else list(keys)


def layer_stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs,
                scan: bool) -> nnx.Module:
  """`n` layers: a list, or (scan) one module whose parameters carry a leading
  `layers` axis, so that the stack compiles once whatever its depth."""
  if not scan:
    return nnx.List([make(rngs) for _ in range(n)])

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs):
    return make(rngs)

  return build(rngs)


def over_layers(layers: nnx.Module, fn: Callable, carry: Any, per_layer: Any, scan: bool):
  """`carry, out = fn(layer, carry, inputs)` through the stack.

  `per_layer` holds each layer's inputs: a list (one entry a layer), or with
  scan a pytree with a leading layer axis. Returns the last carry and the
  outputs in the same form.
  """
  if scan:
    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(layer, carry, inputs):
      return fn(layer, carry, inputs)

    return body(layers, carry, per_layer)
  outs = []
  for layer, inputs in zip(layers, per_layer):
    carry, out = fn(layer, carry, inputs)
    outs.append(out)
  return carry, outs


def fold(key: jax.Array | None, site: int) -> jax.Array | None:
  """A key of its own for one dropout site of a layer."""
  return None if key is None else jax.random.fold_in(key, site)


class Mlp(nnx.Module):
  """Two dense layers with an activation between them, dropout after."""

  def __init__(self, dim: int, hidden: int, activation: str, rngs: nnx.Rngs, dtype,
               out_stddev: float = 0.02, dropout_rate: float = 0.0):
    self.fc = dense(dim, hidden, ("embed", "mlp"), rngs, dtype)
    self.proj = dense(hidden, dim, ("mlp", "embed"), rngs, dtype, stddev=out_stddev)
    self.activation = activation
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    h = ACTIVATIONS[self.activation](self.fc(x, fold(key, 1)))
    return dropout(self.proj(h, fold(key, 2)), self.dropout_rate, key)


class GatedMlp(nnx.Module):
  """SwiGLU (DINOv2's `Dinov2SwiGLUFFN`): silu(x W_gate) * (x W_up), then
  down. The gate and up projections are one matrix `fc` [dim, 2 * hidden],
  gate first, as the checkpoint's fused `weights_in` holds them."""

  def __init__(self, dim: int, hidden: int, activation: str, rngs: nnx.Rngs, dtype,
               out_stddev: float = 0.02, dropout_rate: float = 0.0):
    del activation  # always silu
    self.fc = dense(dim, 2 * hidden, ("embed", "mlp"), rngs, dtype)
    self.proj = dense(hidden, dim, ("mlp", "embed"), rngs, dtype, stddev=out_stddev)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    gate, up = jnp.split(self.fc(x, fold(key, 1)), 2, axis=-1)
    h = jax.nn.silu(gate) * up
    return dropout(self.proj(h, fold(key, 2)), self.dropout_rate, key)
