"""Caption sources. Each yields records `{"id": str, "image": bytes,
"captions": [str]}`: one image, its encoded bytes as stored, and all of its
captions. A record that cannot be read carries `"error"` (the reason) instead
of failing: the loader and `prepare` count it, skip it or stop on it, as
their policy says.

Random access (Grain sources with a stable `repr`, trainable as they are):
  PreparedSource     capjax's own ArrayRecord shards (`capjax prepare`), records.py
  FileSource         images on disk listed by a COCO caption file, a CSV/JSON/JSONL
                     table, or the Karpathy-split `dataset_coco.json` (files.py)
  TfdsSource         any TFDS dataset through `tfds.data_source` (tfds.py)
  HFDatasetSource    a Hugging Face dataset: saved to disk, or `load_dataset`'s (hf.py)
Sequential, read file by file by `prepare` only (webdataset.py, parquet.py):
  WebDatasetSource   tar shards as img2dataset writes them
  ParquetSource      Parquet files with image bytes (img2dataset's, or HF's Image)
Any of them with the captions `capjax caption` wrote for it instead of its
own: RecaptionedSource (recaptioned.py).
A source by its spelling (a path, `tfds:NAME`, `hf:NAME`): open_source,
open_split and ids_and_captions (opening.py).
"""

from pipeline.sources.base import SourceError, TruncatedInput, input_files, unit_name, units
from pipeline.sources.files import FileSource, Item, coco, file_record, karpathy, table
from pipeline.sources.hf import HFDatasetSource
from pipeline.sources.opening import ids_and_captions, open_source, open_split
from pipeline.sources.parquet import ParquetSource
from pipeline.sources.recaptioned import RecaptionedSource
from pipeline.sources.tfds import TfdsSource
from pipeline.sources.webdataset import WebDatasetSource

__all__ = ["SourceError", "TruncatedInput", "input_files", "unit_name", "units", "FileSource",
           "Item", "coco", "file_record", "karpathy", "table", "HFDatasetSource", "ParquetSource",
           "TfdsSource", "WebDatasetSource", "RecaptionedSource", "ids_and_captions",
           "open_source", "open_split"]
