"""A trained captioner, restored from a checkpoint, ready to caption images.

Shared by `eval` and `predict`: it restores the parameters sharded on the
mesh and runs generation on padded batches sharded over the batch axes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import jax
import numpy as np

from pipeline import tokenizer as tokenizer_lib, transforms
from trainer import generate, params as params_lib, sharding


class TrainedCaptioner:

  def __init__(self, checkpoint_path: str, overrides: Sequence[str] = ()):
    """`overrides`: `config.KEY=VALUE` strings applied to the checkpoint's config."""
    r = params_lib.restore(checkpoint_path, overrides)
    self.workdir, self.step, self.cfg, self.mesh, self.params = (
        r.workdir, r.step, r.cfg, r.mesh, r.params)
    cfg = r.cfg
    self.tok = tokenizer_lib.load(os.path.join(self.workdir, "tokenizer"))
    self.bos, self.eos, self.pad = tokenizer_lib.special_ids(self.tok)
    if cfg.eval.num_beams < 1:
      raise ValueError(f"eval.num_beams must be at least 1, got {cfg.eval.num_beams}")
    self._generate = generate.make_generate_fn(
        r.graphdef, cfg.eval, self.bos, self.eos, self.pad,
        r.shardings, sharding.batch_sharding(self.mesh))
    self._pool = ThreadPoolExecutor(os.cpu_count())

  def images(self, encoded: Sequence[bytes]) -> np.ndarray:
    d = self.cfg.data
    return np.stack(list(self._pool.map(
        lambda b: transforms.decode_and_resize(b, d.image_size, d.resize, d.resample),
        encoded)))

  def caption_batches(self, encoded: Iterable[Sequence[bytes]]):
    """Yields (captions, token ids) per batch of encoded images."""
    n_dev = self.mesh.devices.size
    for batch in encoded:
      imgs = self.images(batch)
      # Pad to the full eval batch (one compiled shape), a multiple of the devices.
      size = max(self.cfg.eval.batch_size, len(imgs))
      size = -(-size // n_dev) * n_dev
      padded = np.zeros((size,) + imgs.shape[1:], np.uint8)
      padded[:len(imgs)] = imgs
      ids = self._generate(self.params, jax.device_put(padded, sharding.batch_sharding(self.mesh)))
      ids = np.asarray(jax.device_get(ids))[:len(imgs)]
      yield generate.decode_text(self.tok, ids, self.eos), ids
