"""Run `dicomnode serve` as a real process, as an admin would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.conftest import free_port

# config.example.toml's second route: nodules, once the lung route found lungs. For
# write_config's routes_extra, beside its lung route.
NODULE_ROUTE = """
[[routes]]
name = "chest-ct-nodules"
match = { Modality = "CT" }
models = ["lung-nodule-cnn"]
requires = { min_slices = 20, axial = true, model = "lung-unet2d", min_volume_ml = 500 }
send_to = ["pacs"]
"""


def write_config(
    folder: Path,
    *,
    db_url: str,
    pacs_port: int,
    pacs_aet: str = "ORTHANC",
    quiet_seconds: float = 2,
    port: int | None = None,
    listener_extra: str = "",
    models_path: Path | None = None,
    model: str = "lung-unet2d",
    worker_extra: str = "",
    destinations_extra: str = "",
    send_to: Sequence[str] = ("pacs",),
    spool: Path | None = None,
    routes_extra: str = "",
) -> Path:
    """Write ``folder/node.toml``: one listener, one destination "pacs", one CT route.

    ``models_path`` points [models] at test-built packages and ``model`` names the
    route's model; ``worker_extra`` adds lines to [worker]; ``destinations_extra``
    adds [[destinations]] tables, which ``send_to`` can name beside "pacs";
    ``spool`` is storage.path ("spool" beside the config by default); ``routes_extra``
    adds [[routes]] tables after the CT route.
    """
    port = port or free_port()
    config = folder / "node.toml"
    models = f'[models]\npath = "{models_path}"\n' if models_path is not None else ""
    routes_to = ", ".join(f'"{name}"' for name in send_to)
    config.write_text(
        f"""
[listener]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}
{listener_extra}
[database]
url = "{db_url}"
[storage]
path = "{spool or "spool"}"
min_free_mb = 16
[completion]
quiet_seconds = {quiet_seconds}
sweep_seconds = 0.5
[worker]
poll_seconds = 0.5
{worker_extra}
{models}
[outputs]
validate = "dciodvfy"
[[destinations]]
name = "pacs"
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
timeout_seconds = 20
{destinations_extra}
[[routes]]
name = "chest-ct-lungs"
match = {{ Modality = "CT" }}
models = ["{model}"]
send_to = [{routes_to}]
{routes_extra}
"""
    )
    return config


def listener_port(config: Path) -> int:
    import tomllib

    return int(tomllib.loads(config.read_text())["listener"]["port"])


class NodeProcess:
    """`dicomnode --config CONFIG serve` in the background, stopped with SIGTERM."""

    def __init__(
        self, config: Path, log_name: str = "dicomnode.log", command: str = "serve"
    ) -> None:
        self.config = config
        self.command = command  # serve, listen or worker
        # A restarted node gets its own log: the first one must survive for diagnosis,
        # and a fresh file is how __enter__ knows that this start is the one serving.
        self.log_path = config.parent / log_name
        self.proc: subprocess.Popen[bytes] | None = None
        # Run in the child before it starts (e.g. to lower its descriptor limit).
        self.preexec: Callable[[], None] | None = None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def __enter__(self) -> NodeProcess:
        self.start()
        return self.wait_serving()

    def start(self) -> NodeProcess:
        """Start the process without waiting: several nodes can then start in parallel."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "--config", str(self.config), self.command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=self.preexec,
            )
        return self

    def wait_serving(self, timeout: float = 60) -> NodeProcess:
        """Wait for the "serving:" line of a started process; stop it if it never comes."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dicomnode exited early ({self.proc.returncode}):\n{self.log()}"
                )
            if "serving:" in self.log():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dicomnode did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def kill(self, timeout: float = 30) -> int:
        """SIGKILL the node, as the OOM killer would: no signal handler or cleanup runs."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.kill()
        return int(self.proc.wait(timeout))

    def __exit__(self, *exc: object) -> None:
        self.stop()
