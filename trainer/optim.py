"""The optimiser: AdamW with a warmup schedule, global-norm clipping and no
weight decay on biases and norms, over the parameters that train (all, a
chosen set, or LoRA adapters)."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from trainer.models import lora


def schedule(train: ConfigDict) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, train.learning_rate, max(1, train.warmup_steps))
  rest = max(1, train.steps - train.warmup_steps)
  if train.schedule == "cosine":
    decay = optax.cosine_decay_schedule(train.learning_rate, rest)
  elif train.schedule == "linear":
    decay = optax.linear_schedule(train.learning_rate, 0.0, rest)
  elif train.schedule == "constant":
    decay = optax.constant_schedule(train.learning_rate)
  elif train.schedule == "rsqrt":  # the peak times sqrt(warmup / step)
    scale = max(1, train.warmup_steps)
    decay = lambda t: train.learning_rate * jax.lax.rsqrt(1.0 + t / scale)
  else:
    raise ValueError(f"train.schedule: unknown {train.schedule!r} "
                     "(cosine, linear, rsqrt or constant)")
  return optax.join_schedules([warmup, decay], [train.warmup_steps])


def _decay_mask(params):
  # Matrices and embeddings decay; biases and layer-norm parameters do not.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_name(path) -> str:
  """A parameter's path as "decoder/h/0/attn/query/kernel"."""
  # A Variable's array is the attribute `value` (GetAttrKey) under the
  # parameter's name; a layer may be named "value" too (DictKey).
  keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path
          if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
  return "/".join(str(k) for k in keys)


def trained_filter(cfg: ConfigDict, params) -> Callable[[Any, Any], bool]:
  """Which parameters train, as an `nnx` filter `(path, value) -> bool`.

  Without LoRA: all of them, or those whose names match `train.trainable`.
  With LoRA (`model.lora.rank` > 0): the adapters, and those matching
  `train.trainable`. Never those matching `train.freeze`. Checked against
  `params`: a pattern that matches nothing, or nothing left to train, is an
  error naming the flag.
  """
  with_lora = lora.Spec.of(cfg.model) is not None
  patterns = {}
  for flag in ("trainable", "freeze"):
    text = cfg.train[flag]
    try:
      patterns[flag] = re.compile(text) if text else None
    except re.error as e:
      raise ValueError(f"train.{flag}={text!r}: not a regular expression ({e})") from None
  trainable, freeze = patterns["trainable"], patterns["freeze"]

  def trained(name: str) -> bool:
    if freeze is not None and freeze.search(name):
      return False
    if with_lora and lora.is_adapter(name):
      return True
    return bool(trainable.search(name)) if trainable is not None else not with_lora

  names = [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for flag, regex in patterns.items():
    if regex is not None and not any(regex.search(n) for n in names):
      raise ValueError(f"train.{flag}={regex.pattern!r} matches no parameter "
                       "(names look like encoder/layers/0/mlp/fc/kernel)")
  if not any(trained(n) for n in names):
    raise ValueError(f"no parameter left to train (train.trainable={cfg.train.trainable!r}, "
                     f"train.freeze={cfg.train.freeze!r})")
  return lambda path, _: trained(param_name(path))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm with the norm the step has already computed
  (`update(..., grad_norm=)`): the clip is one multiplication by a scalar,
  which XLA fuses into the optimiser's pass over the gradients, rather than a
  pass of its own and a second norm."""
  def update(updates, state, params=None, *, grad_norm, **_):
    del params
    factor = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


MU_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def optimizer(train: ConfigDict) -> optax.GradientTransformation:
  """AdamW with clipping, over the trained parameters only (`trained_filter`
  splits them off: frozen ones get no gradient and no optimiser state).
  `train.mu_dtype` "bfloat16" keeps Adam's first moment in bfloat16, as
  big_vision does: a quarter less optimiser memory; the second moment and the
  parameters stay float32."""
  mu_dtype = train.get("mu_dtype", "float32")
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f"train.mu_dtype: unknown {mu_dtype!r} ({', '.join(MU_DTYPES)})")
  return optax.chain(
      clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask,
                  mu_dtype=MU_DTYPES[mu_dtype]),
  )
