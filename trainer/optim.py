"""The optimiser: AdamW with a warmup schedule, global-norm clipping and no
weight decay on biases and norms."""

from __future__ import annotations

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
  else:
    raise ValueError(f"train.schedule: unknown {train.schedule!r} "
                     "(cosine, linear or constant)")
  return optax.join_schedules([warmup, decay], [train.warmup_steps])


def _decay_mask(params):
  # Matrices and embeddings decay; biases and layer-norm parameters do not.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(train: ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule(train), b1=train.b1, b2=train.b2,
                  weight_decay=train.weight_decay, mask=_decay_mask),
  )
