"""What every checkpoint carries of itself (item `checksums`), checked on
restore: two 32-bit sums over each array's bits, computed where the array
lives, and SHA-256 of the JSON items."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np



CHECKSUMS = "checksums"


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read, or whose contents do not match the
  checksums saved with it; the message names the step folder and the item."""


def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, in its own shape (plus a trailing
  axis of 2 for 64-bit types): no reshape, so no data moves between devices."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, words).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
  """Two wrapping uint32 sums, exact in any order of reduction: of each word
  times an odd weight of its position (a single flipped bit always changes
  it), and of a mixed hash of word and position."""
  u = _bits(x)
  index = jnp.zeros(u.shape, jnp.uint32)
  for axis, stride in enumerate(np.cumprod((u.shape + (1,))[:0:-1])[::-1]):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(
        int(stride) % 2**32)
  weighted = jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  h = u ^ (index * jnp.uint32(0x9E3779B9))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  mixed = jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)
  return jnp.stack([weighted, mixed])


@jax.jit
def _digests(leaves: list) -> jax.Array:
  return jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def array_checksums(tree: Any) -> dict[str, str]:
  """{leaf path: checksum} of a tree of (possibly sharded, multi-process) arrays."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = np.asarray(_digests([jnp.asarray(leaf) for _, leaf in flat]))
  return {_name(path): f"{a:08x}{b:08x}" for (path, _), (a, b) in zip(flat, values.tolist())}


def _name(path: tuple) -> str:
  """decoder/h/0/attn/key/kernel for a tree path (an nnx Variable's `.value` left out)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def json_checksum(value: Any) -> str:
  """SHA-256 of a JSON item as it reads back."""
  canonical = json.dumps(json.loads(json.dumps(value)), sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()


def checksums_of(arrays: dict[str, Any], jsons: dict[str, Any]) -> dict[str, Any]:
  return {**{k: array_checksums(v) for k, v in arrays.items()},
          **{k: json_checksum(v) for k, v in jsons.items()}}


def verify(where: str, saved: dict | None, arrays: dict[str, Any],
           jsons: dict[str, Any]) -> None:
  """Raises CorruptCheckpoint unless the restored items match `saved`, the
  checksums saved with them (None: a checkpoint written without them)."""
  if saved is None:
    return
  for item, tree in arrays.items():
    got, want = array_checksums(tree), saved.get(item, {})
    for path in sorted(set(got) | set(want)):
      if got.get(path) != want.get(path):
        raise CorruptCheckpoint(f"checkpoint {where}/{item}: array {path} does not match "
                                "the checksum saved with it")
  for item, value in jsons.items():
    if json_checksum(value) != saved.get(item):
      raise CorruptCheckpoint(f"checkpoint {where}/{item}: does not match the checksum "
                              "saved with it")
