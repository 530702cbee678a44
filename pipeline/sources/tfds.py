"""Any TFDS dataset prepared as ArrayRecord, read with `tfds.data_source`."""

from __future__ import annotations

from typing import Any

from pipeline.sources.base import SourceError, reason


def _field(example: dict, key: str):
  """`key` as a feature name, or a path into nested features ("captions/text")."""
  if key in example:
    return example[key]
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def _text(value) -> str:
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord (e.g. `tfds build coco_captions
  --file_format=array_record`), read with `tfds.data_source`, images kept
  encoded. The feature names default to `coco_captions`'s."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", captions_key: str = "captions/text",
               id_key: str = "image/id"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.keys = (image_key, captions_key, id_key)
    self._source = None
    self._len = len(self._reader())

  def _reader(self):
    if self._source is None:
      import tensorflow_datasets as tfds

      try:
        self._source = tfds.data_source(
            self.name, split=self.split, data_dir=self.data_dir, download=False,
            decoders={self.keys[0]: tfds.decode.SkipDecoding()})
      except Exception as e:
        raise SourceError(f"tfds:{self.name} split {self.split!r}: cannot open "
                          f"({reason(e)})") from None
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._reader()[index]
    image_key, captions_key, id_key = self.keys
    try:
      caps = _field(example, captions_key)
      caps = [caps] if isinstance(caps, (str, bytes)) else list(caps)
      return {"id": _text(_field(example, id_key)), "image": bytes(_field(example, image_key)),
              "captions": [_text(c) for c in caps]}
    except KeyError as e:
      raise SourceError(f"tfds:{self.name}: record {index} has no feature {e} "
                        f"(it has {sorted(example)})") from None

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, split={self.split!r}, keys={self.keys}, "
            f"records={len(self)})")
