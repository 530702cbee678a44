"""The model's parameters: abstract shapes with their shardings, the two layer
layouts, and restoring them from a checkpoint into either layout.

A layer stack is held as a dict of layers keyed 0..n-1, or (`scan_layers`) as
one set of arrays with a leading layer axis. Hugging Face tensors map onto the
first; checkpoints hold whichever the run used; `restore` and `to_layout`
move weights between the two, so any checkpoint serves any run.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from trainer import checkpoint, config as config_lib, sharding
from trainer.models import lora
from trainer.models.captioner import build_captioner

# Where the layer stacks sit in the parameter tree (GPT-2's decoder keeps
# Hugging Face's `h`; BLIP's text decoder has `layers`).
STACKS = (("encoder", "layers"), ("decoder", "h"), ("decoder", "layers"))


def abstract_model(cfg: ConfigDict, mesh: Mesh):
  """(graphdef, abstract params, their shardings), without allocating."""
  model = nnx.eval_shape(lambda: build_captioner(cfg.model, cfg.seed))
  graphdef, params = nnx.split(model)
  specs = nnx.get_partition_spec(params)
  shardings = sharding.tree_shardings(params, specs, dict(cfg.mesh.rules), mesh)
  return graphdef, params, shardings


def is_stacked(layers: dict) -> bool:
  return not all(isinstance(k, int) for k in layers)


def to_layout(pure: dict, scan: bool) -> dict:
  """A pure parameter dict with its layer stacks in the requested layout:
  stacked along a leading axis (`scan`) or one entry a layer."""
  out = jax.tree.map(lambda x: x, pure)  # new dicts; the arrays are shared
  for parent_path, name in ((p[:-1], p[-1]) for p in STACKS):
    parent = out
    for p in parent_path:
      parent = parent[p]
    if name not in parent:
      continue
    layers = parent[name]
    if scan and not is_stacked(layers):
      parent[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in
                                                               range(len(layers))))
    elif not scan and is_stacked(layers):
      n = jax.tree.leaves(layers)[0].shape[0]
      parent[name] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
  return out


def _overlay(base: dict, extra: dict) -> dict:
  """`base` with the leaves of `extra` added (nested dicts merged)."""
  out = dict(base)
  for k, v in extra.items():
    out[k] = _overlay(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def load_params(workdir: str, step: int, saved_cfg: ConfigDict, cfg: ConfigDict, mesh: Mesh):
  """The checkpoint's parameters for the model `cfg` describes, sharded on
  `mesh`, whichever layer layout each uses. Where the LoRA settings differ,
  the checkpoint's adapters are merged into its weights and the model gets
  fresh adapters of its own (which leave its outputs unchanged): a base
  model starts a LoRA run, a LoRA run loads as a plain model."""
  _, abs_params, shardings = abstract_model(cfg, mesh)
  saved_lora, new_lora = lora.Spec.of(saved_cfg.model), lora.Spec.of(cfg.model)
  if saved_cfg.model.scan_layers == cfg.model.scan_layers and saved_lora == new_lora:
    return checkpoint.load_params(workdir, step, sharding.with_shardings(abs_params, shardings))
  saved = copy.deepcopy(saved_cfg)
  saved.mesh = cfg.mesh
  _, abs_saved, saved_sh = abstract_model(saved, mesh)
  loaded = checkpoint.load_params(workdir, step, sharding.with_shardings(abs_saved, saved_sh))
  scan = cfg.model.scan_layers

  def convert(pure):
    if saved_lora is not None and saved_lora != new_lora:
      pure = lora.merge(pure, saved_lora.scale)
    pure = to_layout(pure, scan)
    if new_lora is not None and saved_lora != new_lora:
      fresh = nnx.to_pure_dict(nnx.state(build_captioner(cfg.model, cfg.seed)))
      pure = _overlay(pure, lora.adapters_only(fresh))
    return pure

  pure = jax.jit(convert, out_shardings=nnx.to_pure_dict(shardings))(nnx.to_pure_dict(loaded))
  nnx.replace_by_pure_dict(abs_params, pure)
  return abs_params


@dataclasses.dataclass
class Restored:
  """A checkpoint's model, ready to run: its (overridden) config, the mesh,
  the graph, and the parameters sharded on the mesh."""
  workdir: str
  step: int
  cfg: ConfigDict
  mesh: Mesh
  graphdef: Any
  params: Any
  shardings: Any


def restore(checkpoint_path: str, overrides: Sequence[str] = ()) -> Restored:
  """A run directory (or one of its checkpoints) to its model; `overrides` are
  `config.KEY=VALUE` strings applied to the saved config (e.g. another mesh,
  or `config.model.scan_layers=true`)."""
  workdir, steps = checkpoint.candidates(checkpoint_path)
  failed: list[checkpoint.CorruptCheckpoint] = []
  for step in steps:  # a run directory: the newest checkpoint that verifies
    try:
      saved = checkpoint.load_config(workdir, step)
      cfg = config_lib.apply_overrides(copy.deepcopy(saved), list(overrides))
      mesh = sharding.make_mesh(cfg.mesh)
      graphdef, _, shardings = abstract_model(cfg, mesh)
      params = load_params(workdir, step, saved, cfg, mesh)
    except checkpoint.CorruptCheckpoint as e:
      failed.append(e)
      continue
    for e in failed:
      print(f"warning: {e}; using step {step}", file=sys.stderr, flush=True)
    return Restored(workdir, step, cfg, mesh, graphdef, params, shardings)
  raise failed[0]
