"""Real bucket servers on 127.0.0.1 for tests: moto's S3 server and
gcp-storage-emulator, each started in its own process and stopped after,
with the environment the real clients read to reach them (no credentials of
anyone's, no other address)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

BUCKET = "capjax-test"
HOST = "127.0.0.1"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: str, seconds: float = 60) -> None:
  """Until the server answers at `url` (bounded)."""
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  deadline = time.time() + seconds
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode}: {open(log).read()[-2000:]}")
    try:
      opener.open(url, timeout=2).read()
      return
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f"no answer from {url} in {seconds} s: {open(log).read()[-2000:]}")


@contextlib.contextmanager
def _server(args: list[str], probe: str) -> Iterator[None]:
  with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "no_proxy": "*"}, start_new_session=True)
  try:
    _wait(probe, proc, log.name)
    yield
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    os.unlink(log.name)


# Both clients and TensorStore must never see a proxy for the emulators.
_NO_PROXY = {"no_proxy": HOST, "NO_PROXY": HOST}
# The emulators' environment never includes a real profile or token.
_SCRUB = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
          "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
  """moto's S3 server with bucket BUCKET; yields the environment for capjax."""
  port = _free_port()
  url = f"http://{HOST}:{port}"
  with _server([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], url):
    env = {**_NO_PROXY, "AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL": url,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    req = urllib.request.Request(f"{url}/{BUCKET}", method="PUT")
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).read()
    yield env


@contextlib.contextmanager
def gcs_server() -> Iterator[dict[str, str]]:
  """gcp-storage-emulator (in memory, see gcs_emulator.py) with bucket BUCKET;
  yields the environment for capjax."""
  port = _free_port()
  url = f"http://{HOST}:{port}"
  exe = [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py")]
  with _server([*exe, "start", "--host", HOST, "--port", str(port), "--in-memory", "-q",
                "--default-bucket", BUCKET], f"{url}/storage/v1/b/{BUCKET}"):
    yield {**_NO_PROXY, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "testing", "GOOGLE_CLOUD_PROJECT": "capjax-test",
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}


def scrubbed(env: dict[str, str]) -> dict[str, str]:
  """os.environ without real credentials or proxies, plus `env`."""
  return {**{k: v for k, v in os.environ.items() if k not in _SCRUB}, **env}


def forget_clients() -> None:
  """Drops this process's cached gcsfs and s3fs clients (each holds the
  endpoint it was made with)."""
  import gcsfs
  import s3fs
  gcsfs.GCSFileSystem.clear_instance_cache()
  s3fs.S3FileSystem.clear_instance_cache()
