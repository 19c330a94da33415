"""A private Orthanc PACS for tests, benchmarks and a local trial (``LocalOrthanc``).

Starts the Debian ``Orthanc`` binary with a generated configuration: temporary storage and index,
loopback-only HTTP and DICOM ports picked free, the DICOMweb plugin loaded, remote access off and
HTTP basic authentication on (so the client's credentials are exercised). The system service is
never touched.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

ORTHANC_BINARY = "Orthanc"
# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
INSTALL_HINT = (
    "install the real PACS with `sudo scripts/install-serve-deps.sh` "
    "(Debian/Ubuntu: apt-get install orthanc orthanc-dicomweb)"
)


def orthanc_missing() -> str | None:
    """Why a local Orthanc cannot be started here (None when it can)."""
    if shutil.which(ORTHANC_BINARY) is None:
        return f"the Orthanc binary is not on PATH; {INSTALL_HINT}"
    if dicomweb_plugin() is None:
        return f"the Orthanc DICOMweb plugin is not installed; {INSTALL_HINT}"
    return None


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's file, or None."""
    for path in DICOMWEB_PLUGIN_PATHS:
        if Path(path).is_file():
            return path
    return None


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalOrthanc:
    """``with LocalOrthanc() as pacs: pacs.dicomweb_url`` -> a running, empty, private Orthanc."""

    def __init__(
        self, workdir: Path | str | None = None, user: str = "spine", password: str = "grade-test"
    ) -> None:
        missing = orthanc_missing()
        if missing:
            raise RuntimeError(missing)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="spinegrade-orthanc-"))
        self.user, self.password = user, password
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def config(self) -> dict:
        """The Orthanc configuration written to ``workdir/orthanc.json``."""
        return {
            "Name": "spinegrade-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "SPINEGRADE",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Stable quickly: a study counts as complete a second after its last instance.
            "StableAge": 1,
            "HttpsVerifyPeers": False,
        }

    def start(self, timeout_s: float = 30.0) -> LocalOrthanc:
        cfg = self.workdir / "orthanc.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen(
            [ORTHANC_BINARY, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.proc.returncode}; "
                    f"see {self.workdir / 'orthanc.log'}"
                )
            try:
                r = requests.get(f"{self.url}/system", auth=self.auth, timeout=1)
                if r.ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def upload_folder(self, folder: Path | str) -> int:
        """POST every DICOM file under ``folder`` to Orthanc's REST API; returns the count."""
        n = 0
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                r = requests.post(
                    f"{self.url}/instances", data=path.read_bytes(), auth=self.auth, timeout=30
                )
                r.raise_for_status()
                n += 1
        return n

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
