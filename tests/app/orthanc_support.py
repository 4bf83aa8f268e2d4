"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) for the follower tests.

Started with a generated configuration on free loopback ports (HTTP and DICOM), storage in
the test's temporary directory, basic authentication on, and stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.app.process_support import free_port
from tests.environment import missing_tool

USER = "convirt"
PASSWORD = "orthanc-test-password"
START_TIMEOUT_S = 60.0
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
)


@dataclass(frozen=True)
class Orthanc:
    root: str
    dicom_port: int
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.root}/dicom-web"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (USER, PASSWORD)
        return session

    def delete_study(self, study_instance_uid: str) -> None:
        """Delete a study the way a PACS user would (REST), by its StudyInstanceUID."""
        with self.session() as session:
            found = session.post(f"{self.root}/tools/lookup", data=study_instance_uid, timeout=30)
            found.raise_for_status()
            [study] = [r for r in found.json() if r["Type"] == "Study"]
            session.delete(f"{self.root}/studies/{study['ID']}", timeout=30).raise_for_status()


def _binary_and_plugin() -> tuple[str, Path]:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    plugin = next(
        (Path(p) for pattern in PLUGIN_GLOBS for p in sorted(Path("/").glob(pattern.lstrip("/")))),
        None,
    )
    if binary is None or plugin is None:
        missing_tool("Orthanc with its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)")
    return binary, plugin


@contextlib.contextmanager
def running_orthanc(workdir: Path) -> Iterator[Orthanc]:
    binary, plugin = _binary_and_plugin()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "convirt-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    log = workdir / "orthanc.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([binary, str(config_path)], stdout=log_file, stderr=log_file)
    orthanc = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with orthanc.session() as session:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited: {log.read_text(errors='replace')}")
                with contextlib.suppress(requests.ConnectionError):
                    if session.get(f"{orthanc.dicomweb}/studies", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {log.read_text(errors='replace')}")
                time.sleep(0.1)
        yield orthanc
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
