"""Host memory between steps on XLA's CPU backend.

XLA:CPU allocates an executable's scratch memory (the activations the
backward pass reads, gradients in flight) with malloc at every call and frees
it when the call ends: 2.2 GB per step of ViT-B/16 + GPT-2 at batch 8. glibc
serves blocks that large with a fresh mmap and unmaps them on free, so the
kernel zero-fills every page again on the next step's first touch: about
570,000 page faults and 1.1 s of CPU time per step of that model on two
cores. From the second step on, `keep_freed_memory` has glibc keep such
blocks in the process's heap for the next step instead.

Two calls: `share_one_arena` before JAX starts (its threads take their malloc
arenas on their first allocation; only the main arena's heap can hold blocks
that large), `keep_freed_memory` once the first step is done. Until then the
large one-off allocations (the initial state, compilation, the first step)
are mapped and unmapped as usual, so the heap does not keep their holes and
the peak memory stays what it was.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: up to 2 GiB of freed memory stays mapped
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "libtpu", "jax-rocm", "jax_rocm")

_shared = False


def runs_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting JAX:
  JAX_PLATFORMS says cpu, or no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
  return not any(n.lower().startswith(ACCELERATOR_PLUGINS) for n in names)


def _mallopt(*settings: tuple[int, int]) -> bool:
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(p, v) == 1 for p, v in settings)


def share_one_arena() -> bool:
  """On glibc, when JAX computes on the CPU: every thread allocates from the
  main arena. Call before JAX starts. Returns whether it applied."""
  global _shared
  if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and runs_on_cpu():
    _shared = _mallopt((M_ARENA_MAX, 1))
  return _shared


def keep_freed_memory() -> bool:
  """After `share_one_arena` and the first step: large blocks from the heap
  rather than mmap, and up to 2 GiB of freed memory kept at the heap's top,
  so each step reuses the last step's pages. Returns whether it applied."""
  return _shared and _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES),
                              (M_TOP_PAD, KEEP_BYTES))
