"""The device mesh and the mapping of logical axis names onto it.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters and optimiser state sharded) and `tensor` (model
parallelism over heads and MLP units). The batch is sharded over (`data`,
`fsdp`). Parameters name their axes logically (`embed`, `heads`, ...) and the
config's rule table says which mesh axis each name goes to.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")


def _slice_index(device: jax.Device) -> int:
  return getattr(device, "slice_index", 0)


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None,
              slice_of: Callable[[jax.Device], int] = _slice_index) -> Mesh:
  """A mesh of all devices (all processes); one axis size may be -1 (fill).

  On several TPU slices (multi-slice: devices with different `slice_index`)
  the slices split the `data` axis, its outer part, so that only the
  gradient reduction of pure data parallelism crosses the slower network
  between slices; `fsdp`, `tensor` and the rest of `data` stay inside each.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError("mesh: at most one of data, fsdp, tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not a multiple of {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: data x fsdp x tensor = {math.prod(sizes)}, "
                     f"but there are {len(devices)} devices")
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  slices = sorted({slice_of(d) for d in devices})
  if len(slices) == 1:
    return jax.make_mesh(tuple(sizes), AXES, axis_types=axis_types, devices=devices)
  if sizes[0] % len(slices):
    raise ValueError(f"mesh: data = {sizes[0]} does not divide over {len(slices)} slices "
                     "(data parallelism spans the slices)")
  inner = (sizes[0] // len(slices), *sizes[1:])
  blocks = [mesh_utils.create_device_mesh(inner, [d for d in devices if slice_of(d) == s],
                                          allow_split_physical_axes=True) for s in slices]
  return Mesh(np.concatenate(blocks, axis=0), AXES, axis_types=axis_types)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], rules: dict,
                    mesh: Mesh) -> P:
  """The mesh PartitionSpec for an array with logical axis `names`.

  A dimension whose size does not divide by its mesh axes is replicated.
  """
  spec, used = [], set()
  for name, dim in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise KeyError(f"mesh.rules has no rule for the logical axis {name!r}")
    axes = rules[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      logging.warning("replicating a dimension of %d (%s): not divisible by %s=%d",
                      dim, name, axes, size)
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def tree_shardings(abstract_params: Any, specs: Any, rules: dict, mesh: Mesh) -> Any:
  """NamedShardings for a parameter tree, from its logical PartitionSpecs."""
  return jax.tree.map(
      lambda x, s: NamedSharding(mesh, logical_to_mesh(tuple(s), x.shape, rules, mesh)),
      abstract_params, specs, is_leaf=lambda x: isinstance(x, P))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Abstract arrays that carry shardings: what Orbax restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_size: int) -> int:
  """Rows this process feeds per batch: its share of `global_size`, rounded
  up to a multiple of its devices."""
  share = -(-global_size // jax.process_count())
  return -(-share // jax.local_device_count()) * jax.local_device_count()


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of the batch to global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
