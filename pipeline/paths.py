"""Which paths capjax takes. A run directory, a checkpoint and a command's
outputs may be local or in a bucket (`gs://`, `s3://`; see `fs`); every
other path is a local one (a bucket mounted with gcsfuse or mountpoint-s3 is
one). Any other URL is refused in one line naming it, never taken for a
local folder: `os` would quietly make a folder named `s3:` in the working
directory, and on a pod each host would write its own."""

from __future__ import annotations

import re
from typing import Any

from pipeline import fs

URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://")


def refuse_urls(value: Any, what: str, buckets: bool = False) -> None:
  """A ValueError naming `what` if `value` (a path, or a list or text of
  them) holds a URL that `what` cannot take (`buckets`: gs:// and s3:// it can)."""
  texts = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
  for text in texts:
    m = URL.search(text)
    if m is None:
      continue
    if buckets and m.start() == 0 and m.group(1) in fs.BUCKETS:
      continue
    if buckets:
      raise ValueError(f"{what} {text}: {m.group(1)}:// paths are not supported: give a local "
                       "path, gs://BUCKET/... or s3://BUCKET/...")
    raise ValueError(f"{what} {text}: {m.group(1)}:// paths are not supported here: give a "
                     "local path (a bucket mounted with gcsfuse or mountpoint-s3 is one)")
