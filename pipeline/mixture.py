"""Training mixtures: `data.train` naming several sources, each with a weight.

`data.train` is one source (a string, as `sources.open_source` takes it) or a
list of `(source, weight)` pairs or `(name, source, weight)` triples; on the
command line, a string starting with "[" holding such a list. Weights are
positive and normalised; names (for the metrics) default to each source's
folder name.

A `Mixture` is the concatenation of its sources (so that everything reading
every record, tokenizer training and the eval baseline, sees them all), and
its `MixtureOrder` says which source and which of its records fills each
place g of the global stream. The places come in blocks of `BLOCK`; before
block b, every source but the heaviest has had floor(w * b * BLOCK) places
(w its normalised weight, an exact fraction), the heaviest the rest. So each
source's count is within a few samples of its share at every block's end, and
a block gives each source its quota, the rounding remainders rotating across
blocks. Each block's places are shuffled by (seed, block); the k-th draw from
source s is place k of that source's own endless epochs (a fresh order each,
as order.EpochOrder gives a single source). Everything follows from (seed,
g) alone: the process count does not matter, and a resumed stream continues
exactly.
"""

from __future__ import annotations

import ast
import bisect
import math
import os
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from pipeline.order import EpochOrder

BLOCK = 1000  # places per stratified block (more for over 31 sources)
_TAG = 0x6D6978  # keeps a mixture's random streams apart from a single source's


def _is_list_text(value: Any) -> bool:
  return isinstance(value, str) and value.lstrip().startswith("[")


def is_mixture(value: Any) -> bool:
  """Whether a `data.train` value names a mixture rather than one source."""
  return not isinstance(value, str) or _is_list_text(value)


def parse(value: Any) -> list[tuple[str | None, str, float]]:
  """A mixture's `data.train` as `(name or None, source, weight)` entries,
  weights as given; a ValueError naming the bad entry otherwise."""
  if _is_list_text(value):
    try:
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"data.train: {value!r} is not a Python list of (source, weight) "
                       f"pairs ({e})") from None
  if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"data.train: {value!r}: expected a source or a non-empty list of "
                     "(source, weight) pairs")
  entries = []
  for i, item in enumerate(value, 1):
    bad = f"data.train: entry {i} {item!r}:"
    if isinstance(item, str) or not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
      raise ValueError(f"{bad} expected (source, weight) or (name, source, weight)")
    name, spec, weight = item if len(item) == 3 else (None, *item)
    if name is not None and (not isinstance(name, str) or not name):
      raise ValueError(f"{bad} the name must be a non-empty string")
    if not isinstance(spec, str) or not spec:
      raise ValueError(f"{bad} the source must be a non-empty string")
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight <= 0):
      raise ValueError(f"{bad} the weight must be a positive number")
    entries.append((name, spec, weight))
  given = [n for n, _, _ in entries if n is not None]
  if len(set(given)) < len(given):
    raise ValueError(f"data.train: names given twice: {given}")
  return entries


def _local(spec: str) -> bool:
  return ":" not in spec  # tfds:NAME and hf:FOLDER name no local path


def absolute(value: Any) -> Any:
  """`data.train` with its local paths made absolute, in the form it came in
  (a config saved with the run then reads from any directory)."""
  if not is_mixture(value):
    return os.path.abspath(value) if _local(value) else value
  entries = []
  for name, spec, weight in parse(value):
    spec = os.path.abspath(spec) if _local(spec) else spec
    entries.append((spec, weight) if name is None else (name, spec, weight))
  if isinstance(value, str):
    return repr(entries)
  return type(value)(entries)


def present(value: Any) -> bool:
  """Whether every source of `data.train` is remote or on this machine."""
  specs = [s for _, s, _ in parse(value)] if is_mixture(value) else [value]
  return all(not _local(s) or os.path.exists(s) for s in specs)


def default_name(spec: str) -> str:
  """A source's name in the metrics: its folder's (or file's, or dataset's) name."""
  for prefix in ("tfds:", "hf:"):
    if spec.startswith(prefix):
      spec = spec[len(prefix):]
  return os.path.basename(os.path.normpath(spec)) or spec


def names(entries: Sequence[tuple[str | None, str, float]]) -> list[str]:
  """Each entry's name: given, or its default made unique with a suffix."""
  taken = {n for n, _, _ in entries if n is not None}
  out = []
  for name, spec, _ in entries:
    if name is None:
      base = name = default_name(spec)
      suffix = 2
      while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
      taken.add(name)
    out.append(name)
  return out


def open_source(data_cfg, spec: str):
  """One source of `data.train`, opened as `sources.open_split` opens it."""
  from pipeline import sources  # heavy imports, not needed by the loader's workers
  return sources.open_split(data_cfg, "train", spec)


def open_train(data_cfg):
  """The training source of the config: one source, or a Mixture."""
  if not is_mixture(data_cfg.train):
    from pipeline import sources
    return sources.open_split(data_cfg, "train")
  entries = parse(data_cfg.train)
  return Mixture([open_source(data_cfg, spec) for _, spec, _ in entries],
                 [w for _, _, w in entries], names(entries))


def ids_and_captions(source) -> list[tuple[str, list[str]]]:
  """`sources.ids_and_captions`, a mixture's source by source."""
  from pipeline import sources
  if isinstance(source, Mixture):
    return [x for s in source.sources for x in sources.ids_and_captions(s)]
  return sources.ids_and_captions(source)


class Mixture:
  """A random-access source: the records of `sources`, one after another;
  `order(seed)` draws from them by `weights` (normalised)."""

  def __init__(self, sources: Sequence[Any], weights: Sequence[float], names: Sequence[str]):
    if not len(sources) == len(weights) == len(names) or not sources:
      raise ValueError("a mixture needs one weight and one name for each of its sources")
    if len(set(names)) < len(names):
      raise ValueError(f"mixture names given twice: {list(names)}")
    self.sources, self.names = list(sources), list(names)
    for name, s in zip(self.names, self.sources):
      if not len(s):
        raise ValueError(f"data.train: {name} ({s!r}) has no records")
    exact = [Fraction(w) for w in weights]  # floats exactly: the order is integer arithmetic
    if min(exact) <= 0:
      raise ValueError(f"mixture weights must be positive: {list(weights)}")
    self.fractions = [w / sum(exact) for w in exact]
    self.weights = [float(f) for f in self.fractions]
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self.offsets[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of a mixture of {len(self)}")
    s = bisect.bisect_right(self.offsets, index) - 1
    return s, index - self.offsets[s]

  def __getitem__(self, index: int) -> dict[str, Any]:
    s, i = self._locate(int(index))
    return self.sources[s][i]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Records in `indices`' order, each source's read together where it can
    (TFDS reads a batch in parallel)."""
    wanted: dict[int, list[tuple[int, int]]] = {}
    for place, index in enumerate(indices):
      s, i = self._locate(int(index))
      wanted.setdefault(s, []).append((place, i))
    out: list[Any] = [None] * len(indices)
    for s, items in wanted.items():
      src = self.sources[s]
      read_many = getattr(src, "__getitems__", None)
      got = read_many([i for _, i in items]) if read_many else [src[i] for _, i in items]
      for (place, _), record in zip(items, got):
        out[place] = record
    return out

  def __repr__(self) -> str:  # in the stream's description, compared on resume
    parts = ", ".join(f"({n!r}, {s!r}, {w!r})"
                      for n, s, w in zip(self.names, self.sources, self.weights))
    return f"Mixture([{parts}])"

  def order(self, seed: int) -> "MixtureOrder":
    return MixtureOrder([len(s) for s in self.sources], self.fractions, seed, self.offsets)


class MixtureOrder:
  """The mixture's endless stream: `order[g]` is the record (an index into
  the Mixture) at place g; `locate(g)` the source and its draw number;
  `counts(g)` the draws from each source in places [0, g)."""

  def __init__(self, sizes: Sequence[int], fractions: Sequence[Fraction], seed: int,
               offsets: Sequence[int]):
    if sum(fractions) != 1:
      raise ValueError(f"mixture fractions sum to {sum(fractions)}, not 1")
    self._fractions = [(f.numerator, f.denominator) for f in fractions]
    self._rest = max(range(len(fractions)), key=lambda s: fractions[s])  # the heaviest
    # The heaviest's quota, a block less the others' (each at most one above
    # its share), is never negative in blocks of at least S * S places.
    self.block = max(BLOCK, len(fractions) ** 2)
    self._seed = seed
    self._offsets = list(offsets)
    self._epochs = [EpochOrder(n, seed, (_TAG, s)) for s, n in enumerate(sizes)]
    self._blocks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def drawn_before_block(self, b: int) -> np.ndarray:
    """C(b): the draws from each source in the blocks before block b."""
    places = b * self.block
    drawn = [num * places // den for num, den in self._fractions]
    drawn[self._rest] = places - (sum(drawn) - drawn[self._rest])
    return np.asarray(drawn, dtype=np.int64)

  def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each place's source, its rank among that source's places in the
    block, C(b)) for block b."""
    held = self._blocks.get(b)
    if held is None:
      before = self.drawn_before_block(b)
      quota = self.drawn_before_block(b + 1) - before
      layout = np.repeat(np.arange(len(quota)), quota)
      layout = np.random.default_rng((self._seed, _TAG + 1, b)).permutation(layout)
      rank = np.empty(self.block, np.int64)
      for s in range(len(quota)):
        mine = layout == s
        rank[mine] = np.arange(int(quota[s]))
      for old in sorted(self._blocks)[:-1]:  # batches straddle blocks: keep two
        del self._blocks[old]
      held = self._blocks[b] = (layout, rank, before)
    return held

  def locate(self, g: int) -> tuple[int, int]:
    """(source, k): place g holds that source's k-th draw."""
    b, j = divmod(int(g), self.block)
    layout, rank, before = self._block(b)
    s = int(layout[j])
    return s, int(before[s] + rank[j])

  def __getitem__(self, g: int) -> int:
    s, k = self.locate(g)
    return self._offsets[s] + self._epochs[s][k]

  def counts(self, g: int) -> np.ndarray:
    """The draws from each source in places [0, g)."""
    b, j = divmod(int(g), self.block)
    layout, _, before = self._block(b)
    return before + np.bincount(layout[:j], minlength=len(before))
