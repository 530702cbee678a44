"""LoRA adapters: a trainable low-rank update A B beside chosen linear layers.

A layer `decoder/h/0/attn/query` with an adapter computes
x W + b + (alpha / rank) * dropout(x) A B; A [in, rank] starts uniform in
+-1/sqrt(in) and B [rank, out] at zero, as in `peft`, so a model with fresh
adapters computes exactly what its base model does. The adapters are
parameters `.../lora_a` and `.../lora_b` beside the layer's kernel, with the
kernel's logical axes (and its leading `layers` axis when layers are scanned).

`merge` folds them into the kernels: W + (alpha / rank) A B; `strip` drops
them, leaving the base model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from trainer.models.layers import Dense

ADAPTER_NAMES = ("lora_a", "lora_b")
_ADAPTER = re.compile(r"(^|/)lora_[ab]$")


@dataclasses.dataclass(frozen=True)
class Spec:
  rank: int
  alpha: float
  dropout: float
  targets: str  # a regular expression over layer names

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def of(cls, model_cfg: ConfigDict) -> Spec | None:
    """The config's `model.lora`, or None without adapters (rank 0, or a
    config saved before LoRA existed)."""
    c = model_cfg.get("lora")
    if c is None or not c.rank:
      return None
    if c.rank < 0 or not 0.0 <= c.dropout < 1.0:
      raise ValueError(f"model.lora: rank={c.rank}, dropout={c.dropout}: need rank > 0 and "
                       "0 <= dropout < 1")
    try:
      re.compile(c.targets)
    except re.error as e:
      raise ValueError(f"model.lora.targets={c.targets!r}: not a regular expression ({e})"
                       ) from None
    return cls(int(c.rank), float(c.alpha), float(c.dropout), c.targets)


def is_adapter(name: str) -> bool:
  """Whether a parameter name ("decoder/h/0/attn/query/lora_a") is an adapter's."""
  return bool(_ADAPTER.search(name))


def layer_name(path) -> str:
  return "/".join(str(p) for p in path)


def add_adapters(model: nnx.Module, spec: Spec, seed: int) -> None:
  """Gives every linear layer whose name matches `spec.targets` an adapter.
  Works on either layer layout (a stacked layer gets stacked adapters)."""
  regex = re.compile(spec.targets)
  key = jax.random.fold_in(jax.random.key(seed), 0x10a)
  adapted = 0
  for path, module in nnx.iter_modules(model):
    name = layer_name(path)
    if not isinstance(module, Dense) or not regex.search(name):
      continue
    kernel = module.kernel
    axes = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    *lead, n_in, n_out = kernel.shape
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(jax.random.fold_in(key, adapted), (*lead, n_in, spec.rank),
                           jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, spec.rank, n_out), jnp.float32)
    module.lora_a = nnx.data(nnx.Param(a, out_sharding=(*axes[:-1], None), eager_sharding=False))
    module.lora_b = nnx.data(nnx.Param(b, out_sharding=(*axes[:-2], None, axes[-1]),
                                       eager_sharding=False))
    module.lora_scale = spec.scale
    module.lora_dropout = spec.dropout
    adapted += 1
  if not adapted:
    raise ValueError(f"model.lora.targets={spec.targets!r} matches no linear layer "
                     "(names look like decoder/h/0/attn/query or encoder/layers/0/mlp/fc)")


def _without_adapters(pure: dict, fold: Callable | None) -> dict:
  out: dict[Any, Any] = {k: _without_adapters(v, fold) if isinstance(v, dict) else v
                         for k, v in pure.items()}
  if "lora_a" in out:
    a, b = out.pop("lora_a"), out.pop("lora_b")
    if fold is not None:
      out["kernel"] = fold(out["kernel"], a, b)
  return out


def merge(pure: dict, scale: float) -> dict:
  """A pure parameter dict with every adapter folded into its kernel
  (W + scale A B) and removed; arrays without adapters are shared."""
  return _without_adapters(pure, lambda w, a, b: (w + scale * (a @ b)).astype(w.dtype))


def strip(pure: dict) -> dict:
  """A pure parameter dict without its adapters: the base model's."""
  return _without_adapters(pure, None)


def adapters_only(pure: dict) -> dict:
  """The adapters of a pure parameter dict, in its nesting (empty branches dropped)."""
  out = {}
  for k, v in pure.items():
    if isinstance(v, dict):
      sub = adapters_only(v)
      if sub:
        out[k] = sub
    elif k in ADAPTER_NAMES:
      out[k] = v
  return out
