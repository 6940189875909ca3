"""Run `dicomnode serve` as a real process, as an admin would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port


def write_config(
    folder: Path,
    *,
    db_url: str,
    pacs_port: int,
    pacs_aet: str = "ORTHANC",
    quiet_seconds: float = 2,
    port: int | None = None,
    listener_extra: str = "",
) -> Path:
    port = port or free_port()
    config = folder / "node.toml"
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
path = "spool"
min_free_mb = 16
[completion]
quiet_seconds = {quiet_seconds}
sweep_seconds = 0.5
[worker]
poll_seconds = 0.5
[outputs]
validate = "dciodvfy"
[[destinations]]
name = "pacs"
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
timeout_seconds = 20
[[routes]]
name = "chest-ct-lungs"
match = {{ Modality = "CT" }}
models = ["lung-unet2d"]
send_to = ["pacs"]
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

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def __enter__(self) -> NodeProcess:
        log = self.log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "--config", str(self.config), self.command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
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
