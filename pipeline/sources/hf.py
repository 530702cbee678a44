"""Hugging Face `datasets`: a folder saved with `save_to_disk`, or whatever
`datasets.load_dataset` reads without a network and without loading scripts:
a local folder of Parquet/CSV/JSON files or an imagefolder (images beside a
metadata.csv or metadata.jsonl), or a Hub repository already in the local cache.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pipeline.sources.base import SourceError, caption_list, reason
from pipeline.sources.files import file_record


def _saved(path: str) -> bool:
  """Written by `save_to_disk` (a Dataset or a DatasetDict)."""
  return any(os.path.isfile(os.path.join(path, f))
             for f in ("state.json", "dataset_dict.json"))


@contextlib.contextmanager
def _offline():
  """Offline, unless the environment says otherwise. The libraries read
  HF_HUB_OFFLINE once, when imported (perhaps before this source was
  made), so their flags are set too, for the duration."""
  names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
  environ = {name: os.environ.get(name) for name in names}
  for name in names:
    os.environ.setdefault(name, "1")
  import datasets
  from huggingface_hub import constants

  offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
  saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = offline
  try:
    yield
  finally:
    datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
    for name, value in environ.items():  # the rest of the process as it was
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


class HFDatasetSource:
  """A `datasets` Dataset (the split `split` of a DatasetDict, default train
  for `load_dataset`): an image column (an `Image` feature, or file paths)
  and a caption column (a string or a list). Nothing is downloaded: Hub
  repositories are read from the local cache (HF_HUB_OFFLINE=1 unless the
  environment says otherwise)."""

  def __init__(self, path: str, split: str | None = None, image_column: str = "image",
               caption_column: str = "caption"):
    self.path = os.path.abspath(path) if os.path.exists(path) else path
    self.split = split
    self.columns = (image_column, caption_column)
    self._ds = None
    ds = self._dataset()
    for column in self.columns:
      if column not in ds.column_names:
        raise SourceError(f"hf:{path}: no column {column!r} (it has {ds.column_names})")
    self._len = len(ds)

  def _load(self):
    import datasets

    if os.path.isdir(self.path) and _saved(self.path):
      ds = datasets.load_from_disk(self.path)
      if isinstance(ds, datasets.DatasetDict):
        split = self.split or "train"
        if split not in ds:
          raise SourceError(f"hf:{self.path}: no split {split!r} (it has {sorted(ds)})")
        ds = ds[split]
      return ds
    try:
      with _offline():
        return datasets.load_dataset(self.path, split=self.split or "train")
    except (ValueError, FileNotFoundError, OSError) as e:
      raise SourceError(f"hf:{self.path}: datasets.load_dataset cannot read it offline "
                        f"({reason(e, 300)})") from None

  def _dataset(self):
    if self._ds is None:
      import datasets

      ds = self._load()
      image_column = self.columns[0]
      if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
      self._ds = ds
    return self._ds

  def __len__(self) -> int:
    return self._len

  @property
  def key(self) -> str:
    """Changes with the dataset's content (prepare's plan)."""
    return self._dataset()._fingerprint

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._dataset()[index]
    image, caps = row[self.columns[0]], row[self.columns[1]]
    caps = caption_list(caps)
    if isinstance(image, dict) and image.get("bytes"):
      return {"id": str(index), "image": image["bytes"], "captions": caps,
              "path": f"hf:{self.path} row {index}"}
    if image is None:
      return {"id": str(index), "image": b"", "captions": caps, "error": "no image",
              "path": f"hf:{self.path} row {index}"}
    return file_record(str(index), image.get("path") if isinstance(image, dict) else image, caps)

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __repr__(self) -> str:
    return (f"HFDatasetSource({self.path!r}, split={self.split!r}, columns={self.columns}, "
            f"records={len(self)})")
