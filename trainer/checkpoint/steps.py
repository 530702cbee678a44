"""Which checkpoint a path names."""

from __future__ import annotations

import os

from pipeline import fs
from trainer.checkpoint.mirror import manager


def find(path: str) -> tuple[str, int]:
  """A run directory, its `checkpoints/` folder or one step folder, to
  (run directory, step); the latest step unless one is named."""
  workdir, steps = candidates(path)
  return workdir, steps[0]


def candidates(path: str) -> tuple[str, list[int]]:
  """A run directory, its `checkpoints/` folder or one step folder, to (run
  directory, steps to try, newest first): just the one step if one is named."""
  path = fs.absolute(path)
  if not fs.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path}: no such directory")
  base = os.path.basename(path)
  if base.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    return os.path.dirname(os.path.dirname(path)), [int(base)]
  workdir = os.path.dirname(path) if base == "checkpoints" else path
  steps = sorted(manager(workdir, read_only=True).all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"--checkpoint {path}: holds no complete checkpoint")
  return workdir, steps
