"""What every source shares: its errors, and its units of work for `prepare`.

`prepare` cuts a source into units, each written as one output shard: a
fixed range of records of a random-access source (`RangeUnit`), or one input
file of a sharded source (a WebDataset tar, a Parquet file). A unit reads its
records in order as `(work done, record)` pairs, the work in the unit's own
measure (records, rows or bytes; `size` in total), so that progress and ETA
can be told before any unit is finished. Its `key` names its input, so that a
prepare run again reuses a shard only if its input has not changed.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Iterator, Protocol, Sequence


class SourceError(ValueError):
  """Bad input, with a message that names the file and the record."""


class TruncatedInput(Exception):
  """An input file ended early: raised by a unit after the records before
  the damage, which are kept; the message names the file."""


class Unit(Protocol):
  name: str  # what errors and progress name: a file, or a range of records
  key: str  # the input's identity: it changes when the input does
  size: int  # the work in the unit, in its own measure

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]: ...


def caption_list(value: Any) -> list[str]:
  """A caption cell (a string, a list of them, or nothing) as its non-empty captions."""
  values = value if isinstance(value, (list, tuple)) else [value]
  return [str(v).strip() for v in values if v is not None and str(v).strip()]


def reason(e: BaseException, limit: int = 200) -> str:
  """An exception's message for a one-line error: its first line, or its type."""
  text = str(e).strip()
  return text.splitlines()[0][:limit] if text else type(e).__name__


class RangeUnit:
  """Records [start, stop) of a random-access source. A source that can cut
  out a range of its rows (`window(start, stop)`) gives the unit only those:
  a worker then holds its own unit's rows, not the whole table."""

  def __init__(self, source: Any, start: int, stop: int):
    window = getattr(source, "window", None)
    self.source, self.offset = (window(start, stop), start) if window else (source, 0)
    self.start, self.stop = start, stop
    self.name = f"records {start}..{stop - 1}"
    self.key = f"{start}:{stop}"
    self.size = stop - start

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
    for i in range(self.start, self.stop):
      yield i - self.start + 1, self.source[i - self.offset]


class FileUnit:
  """One input file, local or in a bucket; `read` is the format's."""

  def __init__(self, path: str):
    from pipeline import fs
    self.path = self.name = path
    self.size, version = fs.version(path)  # a rewritten file, or a new upload: another input
    self.key = f"{fs.absolute(path)} {self.size} {version}"

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
    raise NotImplementedError


def unit_name(unit: Any) -> str:
  """What a unit's outputs are named after (`capjax caption`'s NAME.parquet):
  its input file without the extension, or its first record's number."""
  if isinstance(unit, RangeUnit):
    return f"records-{unit.start:09d}"
  base = os.path.basename(unit.name)
  return base.split(".")[0] or base


def units(source: Any, num_shards: int | None) -> list:
  """`source`'s units: its own (one per input file) if it has them, else
  `num_shards` ranges of records (default: one per 10,000, at least 8)."""
  if hasattr(source, "units"):
    return source.units()
  n = len(source)
  if not n:
    return []
  count = num_shards or max(8, -(-n // 10_000))
  count = max(1, min(count, n))
  bounds = [n * s // count for s in range(count + 1)]
  return [RangeUnit(source, bounds[s], bounds[s + 1]) for s in range(count)]


def _braces(pattern: str) -> list[str]:
  """`a{000..012}b` and `a{x,y}b` expanded, as a shell (and WebDataset) would."""
  m = re.search(r"\{([^{}]*)\}", pattern)
  if not m:
    return [pattern]
  head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    lo, hi = r.groups()
    width = len(lo) if lo.startswith("0") else 0
    choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    if not choices:
      raise SourceError(f"{pattern}: {{{body}}} is an empty range")
  else:
    choices = body.split(",")
  return [p for c in choices for p in _braces(head + c + tail)]


def input_files(spec: str, suffixes: Sequence[str]) -> list[str]:
  """The files a spec names: a brace pattern (`cc3m/{00000..00331}.tar`), a
  glob, a folder (its files with `suffixes`, sorted), or one file; local, or
  in a bucket (gs://, s3://)."""
  from pipeline import fs
  if fs.is_bucket(spec):
    return _bucket_files(spec, suffixes)
  if os.path.isdir(spec):
    files = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(tuple(suffixes)))
    if not files:
      raise SourceError(f"{spec}: no {' or '.join(suffixes)} files in this folder")
    return list(dict.fromkeys(files))  # a file named twice is read once
  files = []
  for pattern in _braces(spec):
    if glob.has_magic(pattern):
      found = sorted(glob.glob(pattern))
      if not found:
        raise SourceError(f"{pattern}: matches no file")
      files.extend(found)
    elif os.path.isfile(pattern):
      files.append(pattern)
    else:
      raise FileNotFoundError(f"{pattern}: no such file")
  return list(dict.fromkeys(files))  # a file named twice is read once


def _bucket_files(spec: str, suffixes: Sequence[str]) -> list[str]:
  from pipeline import fs
  spec = fs.absolute(spec)
  if not glob.has_magic(spec) and "{" not in spec and fs.isdir(spec):
    files = [fs.join(spec, n) for n in fs.listdir(spec) if n.endswith(tuple(suffixes))]
    if not files:
      raise SourceError(f"{spec}: no {' or '.join(suffixes)} files in this folder")
    return files
  files = []
  for pattern in _braces(spec):
    if glob.has_magic(pattern):
      found = fs.glob(pattern)
      if not found:
        raise SourceError(f"{pattern}: matches no file")
      files.extend(found)
    elif fs.isfile(pattern):
      files.append(pattern)
    else:
      raise FileNotFoundError(f"{pattern}: no such file")
  return list(dict.fromkeys(files))  # a file named twice is read once
