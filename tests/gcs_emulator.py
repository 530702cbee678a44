"""gcp-storage-emulator as the tests start it, one gap closed: its media
downloads carry no `x-goog-generation` header, which real GCS sends and
TensorStore's GCS driver reads (OCDBT, Orbax's format, compares generations
on every manifest read: "Malformed StorageGeneration" without it). Run as
`python tests/gcs_emulator.py start --host ... --port ...`."""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # objects.get (?alt=media) calls it by name
server.HANDLERS = tuple((regex, {m: download if h is _download else h for m, h in table.items()})
                        for regex, table in server.HANDLERS)

if __name__ == "__main__":
  sys.exit(main())
