"""A source with new captions: each record's captions replaced by the one
`capjax caption` wrote for it (OUT/NAME.parquet, matched by unit name and
record key), so that `prepare --captions OUT` turns a recaptioned image set
into training data."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline import fs
from pipeline.sources.base import SourceError, unit_name, units


class RecaptionedUnit:
  """A unit whose records carry the captions of its Parquet file; a record
  it has no row for (an image `caption` skipped) has none, and `prepare`
  skips it. The key joins the unit's and the Parquet file's: either changed
  is a new input."""

  def __init__(self, unit: Any, path: str):
    self.unit, self.path = unit, path
    self.name, self.size = unit.name, unit.size
    size, version = fs.version(path)
    self.key = f"{unit.key} captions {path} {size} {version}"

  def read(self) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq
    with fs.open_read(self.path) as f:
      table = pq.read_table(f, columns=["key", "caption"])
    new = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    for work, rec in self.unit.read():
      caption = new.get(str(rec.get("id")))
      yield work, {**rec, "captions": [caption] if caption else []}


class RecaptionedSource:
  """`source` read unit by unit, with the captions in `folder`."""

  def __init__(self, source: Any, folder: str):
    self.source, self.folder = source, fs.absolute(folder)

  def units(self) -> list[RecaptionedUnit]:
    out = []
    for unit in units(self.source, None):
      path = fs.join(self.folder, unit_name(unit) + ".parquet")
      if not fs.isfile(path):
        raise SourceError(f"--captions {self.folder}: no {unit_name(unit)}.parquet for "
                          f"{unit.name} (run `capjax caption` on the same source into it)")
      out.append(RecaptionedUnit(unit, path))
    return out

  def __repr__(self) -> str:
    return f"RecaptionedSource({self.source!r}, captions={self.folder!r})"
