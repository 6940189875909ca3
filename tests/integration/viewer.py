"""OHIF, the web viewer radiologists use, in Debian's Chromium, reading from Orthanc.

- :class:`OhifServer` serves OHIF's prebuilt ``dist/`` (``tests/viewer/install.sh``
  unpacks the pinned ``@ohif/app``) with a configuration whose one data source is
  Orthanc's DICOMweb root, proxied on the same origin so the browser needs no CORS.
- :class:`Browser` drives one Chromium page through ``tests/viewer/drive.mjs``
  (``playwright-core``), one JSON command at a time.
"""

from __future__ import annotations

import json
import mimetypes
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import REPO, free_port

VIEWER = REPO / "tests" / "viewer"
OHIF_DIST = VIEWER / "ohif"
CHROMIUM = Path("/usr/bin/chromium")

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '%(root)s',
        qidoRoot: '%(root)s',
        wadoRoot: '%(root)s',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def missing() -> str | None:
    """Return what the viewer test lacks on this machine, or None when all is there."""
    if not (OHIF_DIST / "index.html").is_file():
        return f"OHIF is not unpacked in {OHIF_DIST} (run tests/viewer/install.sh)"
    if not (VIEWER / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (run tests/viewer/install.sh)"
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not CHROMIUM.is_file():
        return "Debian's chromium is not installed (apt-get install chromium)"
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test's output stays readable

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
            return
        path = self.path.split("?", 1)[0].lstrip("/")
        if path == "app-config.js":
            self._send(200, "application/javascript", self.server.app_config)
            return
        target = (OHIF_DIST / path).resolve()
        if not target.is_file() or OHIF_DIST.resolve() not in target.parents:
            target = OHIF_DIST / "index.html"  # OHIF's own routes (/viewer, ...)
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, kind, target.read_bytes())

    def _proxy(self) -> None:
        request = urllib.request.Request(self.server.orthanc + self.path)
        for name in ("Accept",):
            if self.headers.get(name):
                request.add_header(name, self.headers[name])
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                self._send(response.status, response.headers.get("Content-Type", ""), body)
        except urllib.error.HTTPError as exc:
            self._send(exc.code, exc.headers.get("Content-Type", "text/plain"), exc.read())

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    orthanc: str
    app_config: bytes


class OhifServer:
    """Serve OHIF on a loopback port, its DICOMweb data source proxied to ``orthanc``.

    Parameters
    ----------
    orthanc : str
        Orthanc's HTTP root, e.g. ``http://127.0.0.1:8042``.
    """

    def __init__(self, orthanc: str) -> None:
        self.port = free_port()
        self.server = _Server(("127.0.0.1", self.port), _Handler)
        self.server.orthanc = orthanc.rstrip("/")
        root = f"{self.url}/dicom-web"
        self.server.app_config = (APP_CONFIG % {"root": root}).encode()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OhifServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class BrowserError(RuntimeError):
    """A browser command failed (the page's own message)."""


class Browser:
    """One headless Chromium page, driven by ``playwright-core`` in a Node process."""

    def __init__(self) -> None:
        self.home = tempfile.TemporaryDirectory(prefix="dicomnode-chromium-")
        self.proc = subprocess.Popen(
            ["node", str(VIEWER / "drive.mjs")],
            cwd=VIEWER,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Chromium writes its profile under HOME: a throwaway one, not the checkout.
            env={"PATH": "/usr/bin:/bin", "CHROMIUM": str(CHROMIUM), "HOME": self.home.name},
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.home.cleanup()

    def _do(self, **command: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise BrowserError(f"the browser driver exited: {self.proc.stderr.read()[-2000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise BrowserError(f"{command['op']}: {answer['error']}")
        return answer["value"]

    def goto(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        self._do(op="goto", url=url)

    def eval(self, js: str) -> Any:
        """Return the JSON value of the JavaScript function ``js`` run in the page."""
        return self._do(op="eval", js=js)

    def wait(self, js: str, timeout_s: float = 60) -> Any:
        """Wait until the JavaScript function ``js`` returns a truthy value; return it."""
        return self._do(op="wait", js=js, timeout_ms=int(timeout_s * 1000))

    def dblclick(self, selector: str) -> None:
        """Double-click the first element ``selector`` (Playwright's syntax) finds."""
        self._do(op="dblclick", selector=selector)

    def click(self, selector: str) -> None:
        """Click the first element ``selector`` finds."""
        self._do(op="click", selector=selector)

    def screenshot(self, path: Path) -> None:
        """Save the page as a PNG."""
        self._do(op="screenshot", path=str(path))

    def console(self) -> list[str]:
        """Return the page's console lines so far."""
        return list(self._do(op="console"))
