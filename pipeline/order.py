"""Endless epochs over a source's records, each in its own random order: the
order of a single source's stream (loader.GlobalOrder) and of each source of
a mixture (mixture.MixtureOrder)."""

from __future__ import annotations

import grain
import numpy as np

# Up to this many records an epoch's order is a numpy permutation held in
# memory (4 bytes a record), a few microseconds an element; beyond it Grain's
# memory-free index shuffle (about 60 microseconds an element, measured here).
PERMUTATION_LIMIT = 1 << 25


class EpochOrder:
  """Endless epochs over n records, each epoch in its own order: `order[g]` is
  the record at place g. The orders follow from (seed, *stream, epoch)."""

  def __init__(self, n: int, seed: int, stream: tuple[int, ...] = ()):
    self._n, self._key = n, (seed, *stream)
    self._orders: dict[int, np.ndarray] = {}
    # A stream of its own (a mixture's source) gets a shuffle seed of its own.
    shuffle_seed = (int(np.random.SeedSequence(self._key).generate_state(1)[0]) if stream
                    else seed % 2**32)
    self._big = grain.MapDataset.range(n).shuffle(seed=shuffle_seed)

  def __getitem__(self, g: int) -> int:
    if self._n > PERMUTATION_LIMIT:
      return self._big[g]  # epoch g // n's order, in [0, n)
    epoch, j = divmod(g, self._n)
    order = self._orders.get(epoch)
    if order is None:
      # Batches straddle epochs: keep the two latest orders.
      for old in sorted(self._orders)[:-1]:
        del self._orders[old]
      order = np.random.default_rng((*self._key, epoch)).permutation(self._n).astype(np.int64)
      self._orders[epoch] = order
    return int(order[j])
