"""The paths capjax reads and writes are local ones (a bucket mounted with
gcsfuse or mountpoint-s3 is one). A URL (`gs://`, `s3://`, `http://`, ...)
is refused in one line naming it, never taken for a local folder: `os`
would quietly make a folder named `s3:` in the working directory, and on a
pod each host would write its own."""

from __future__ import annotations

import re
from typing import Any

URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://")


def refuse_urls(value: Any, what: str) -> None:
  """A ValueError naming `what` if `value` (a path, or a list or text of
  them) holds a URL."""
  texts = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
  for text in texts:
    m = URL.search(text)
    if m:
      raise ValueError(f"{what} {text}: {m.group(1)}:// paths are not supported: give a local "
                       "path (a bucket mounted with gcsfuse or mountpoint-s3 is one)")
