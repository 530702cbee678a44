"""gcp-storage-emulator as the tests start it, two gaps closed in what it
sends, where real GCS does otherwise:

- its media downloads carry no `x-goog-generation` header, which TensorStore's
  GCS driver reads (OCDBT, Orbax's format, compares generations on every
  manifest read: "Malformed StorageGeneration" without it);
- it takes a suffix range (`Range: bytes=-N`, the last N bytes, RFC 9110) for
  no range and sends the whole object, where ArrayRecord's GCS reader asks
  for a file's last block so ("Failed to read RiegeliPostscript").

Run as `python tests/gcs_emulator.py start --host ... --port ...`."""

import re
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    obj = None
  headers = request._request_handler.headers
  suffix = re.fullmatch(r"\s*bytes=-([0-9]+)\s*", headers.get("range", ""))
  if obj is not None and suffix:
    del headers["range"]
    headers["Range"] = f"bytes={max(0, int(obj['size']) - int(suffix.group(1)))}-"
  _download(request, response, storage, *args, **kwargs)
  if obj is None:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # objects.get (?alt=media) calls it by name
server.HANDLERS = tuple((regex, {m: download if h is _download else h for m, h in table.items()})
                        for regex, table in server.HANDLERS)

if __name__ == "__main__":
  sys.exit(main())
