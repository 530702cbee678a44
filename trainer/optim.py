"""The optimiser: AdamW with a warmup schedule, global-norm clipping, no
weight decay on biases and norms, and optional frozen parameters."""

from __future__ import annotations

import re

import jax
import optax
from ml_collections import ConfigDict


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
  keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
  return "/".join(str(k) for k in keys if k != "value")


def _frozen_mask(pattern: str):
  regex = re.compile(pattern)

  def mask(params):
    out = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(param_name(path))),
                                           params)
    if not any(jax.tree.leaves(out)):
      raise ValueError(f"train.freeze={pattern!r} matches no parameter "
                       "(names look like encoder/layers/0/mlp/fc/kernel)")
    return out

  return mask


def optimizer(train: ConfigDict) -> optax.GradientTransformation:
  """AdamW with clipping. Parameters whose name matches `train.freeze` (a
  regular expression, e.g. "^encoder/") get zero gradients before clipping
  and no weight decay: they do not move."""
  decay = _decay_mask
  steps = []
  if train.freeze:
    frozen = _frozen_mask(train.freeze)
    steps.append(optax.masked(optax.set_to_zero(), frozen))
    decay = lambda params: jax.tree.map(lambda d, f: d and not f, _decay_mask(params),
                                        frozen(params))
  return optax.chain(
      *steps,
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=decay),
  )
