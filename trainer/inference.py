"""A trained captioner, restored from a checkpoint, ready to caption images.

Shared by `eval` and `predict`: it restores the parameters sharded on the
mesh (every process of a multi-process run holds its part) and runs
generation on fixed-size batches sharded over the mesh's batch axes, each
process feeding its own rows.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import jax
import numpy as np

from pipeline import images, tokenizer as tokenizer_lib, transforms
from trainer import generate, params as params_lib, sharding


class TrainedCaptioner:

  def __init__(self, checkpoint_path: str | params_lib.Restored, overrides: Sequence[str] = (),
               sampling: tuple[int, float, float] | None = None, num_return: int = 0):
    """A checkpoint (`overrides`: `config.KEY=VALUE` strings applied to its
    config), or a model in memory (a run evaluating itself). `sampling`
    (seed, temperature, top_p): `generate_scored` draws its captions;
    `num_return` N > 0: it gives N per image (the best beams, or draws)."""
    r = checkpoint_path if isinstance(checkpoint_path, params_lib.Restored) else \
        params_lib.restore(checkpoint_path, overrides)
    self.workdir, self.step, self.cfg, self.mesh, self.params = (
        r.workdir, r.step, r.cfg, r.mesh, r.params)
    cfg = r.cfg
    self.tok = tokenizer_lib.load(os.path.join(self.workdir, "tokenizer"))
    dec = cfg.model.decoder
    self.bos, self.eos, self.pad = ((dec.bos_token_id, dec.eos_token_id, dec.pad_token_id)
                                    if "eos_token_id" in dec else
                                    tokenizer_lib.special_ids(self.tok))
    self.start = transforms.start_tokens(self.tok, cfg.model, self.bos)
    if cfg.eval.num_beams < 1:
      raise ValueError(f"eval.num_beams must be at least 1, got {cfg.eval.num_beams}")
    self._generate = generate.make_generate_fn(
        r.graphdef, cfg.eval, self.start, self.eos, self.pad,
        r.shardings, sharding.batch_sharding(self.mesh))
    self._scored = generate.make_generate_fn(
        r.graphdef, cfg.eval, self.start, self.eos, self.pad, r.shardings,
        sharding.batch_sharding(self.mesh), with_logprob=True, sampling=sampling,
        num_return=num_return)
    self.sampling = sampling
    self._pool = ThreadPoolExecutor(os.cpu_count())

  def decode(self, encoded: Sequence[bytes]) -> list[np.ndarray | images.BadImage]:
    """Each image at the model's input size, or the BadImage it raised."""
    d = self.cfg.data

    def one(data):
      try:
        return images.decode_and_resize(data, d.image_size, d.resize, d.resample,
                                        crop_fraction=d.get("crop_fraction", 1.0))
      except images.BadImage as e:
        return e

    return list(self._pool.map(one, encoded))

  def generate(self, local_images: np.ndarray) -> np.ndarray:
    """This process's rows [local batch, H, W, 3] uint8 to the token ids of
    every process's rows [global batch, L], process by process, on every
    process."""
    pixels = jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh),
                                                    local_images)
    ids = self._generate(self.params, pixels)
    if jax.process_count() == 1:
      return np.asarray(ids)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(ids, tiled=True))

  def generate_scored(self, images: np.ndarray, seeds: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One process's rows [B, H, W, 3] uint8 (a process running alone, on
    its own devices) to token ids [B, L] and each caption's mean token
    log-probability [B], EOS included ([B, N, L] and [B, N] with
    `num_return`). Sampling draws row r with `seeds[r]`."""
    batch = sharding.batch_sharding(self.mesh)
    args = [jax.device_put(images, batch)]
    if self.sampling is not None:
      args.append(jax.device_put(np.asarray(seeds, np.uint32), batch))
    ids, total = self._scored(self.params, *args)
    ids, total = np.asarray(ids), np.asarray(total)
    ended = ids == self.eos
    lengths = np.where(ended.any(axis=-1), ended.argmax(axis=-1) + 1, ids.shape[-1])
    return ids, total / lengths

  def caption_batches(self, batches: Iterable[Sequence[tuple[str, bytes]]]):
    """Yields (captions, token ids) per batch of (name, encoded image) pairs
    (one process); an unusable image is an error naming it."""
    for batch in batches:
      imgs = self.decode([data for _, data in batch])
      for (name, _), img in zip(batch, imgs):
        if isinstance(img, images.BadImage):
          raise images.BadImage(f"{name}: {img}")
      size = sharding.local_batch_size(max(self.cfg.eval.batch_size, len(imgs)))
      padded = np.zeros((size, *imgs[0].shape), np.uint8)  # one compiled shape
      padded[:len(imgs)] = imgs
      ids = self.generate(padded)[:len(imgs)]
      yield generate.decode_text(self.tok, ids, self.eos), ids
