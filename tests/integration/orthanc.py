"""A real Orthanc PACS (Debian's package) on loopback ports, for tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """Start Orthanc with a temporary configuration and storage; stop it on exit.

    ``modalities`` (name -> [AE title, host, port]) become Orthanc's "DicomModalities":
    the peers it may call, which includes where it sends Storage Commitment reports
    (to the modality whose AE title made the request).
    """

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, list[str | int]] | None = None,
        dicomweb: bool = False,
        env: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.exe = exe
        if dicomweb and not Path(DICOMWEB_PLUGIN).is_file():
            raise RuntimeError("Orthanc's DICOMweb plugin is not installed (orthanc-dicomweb)")
        self.workdir = workdir
        self.aet = aet
        self.modalities = modalities or {}
        self.dicomweb = dicomweb
        self.env = env  # e.g. TCP_NODELAY=1, which Orthanc's DICOM stack (dcmtk) reads
        self.extra = extra or {}  # more configuration options, e.g. DicomAlwaysAllowFind
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpBindAddress": "127.0.0.1",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            # Debian's orthanc-dicomweb: the DICOMweb root OHIF reads (/dicom-web/).
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 2,
            "DicomModalities": self.modalities,
            **self.extra,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [self.exe, str(path)], stdout=self.log, stderr=self.log, env=self.env
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("Orthanc did not start within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def upload(self, path: Path) -> None:
        """Store one DICOM file through the REST API (any transfer syntax Orthanc reads)."""
        request = urllib.request.Request(
            self.url + "/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def download(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=30) as r:
            return r.read()

    def series_by_modality(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.get("/series?expand"):
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out
