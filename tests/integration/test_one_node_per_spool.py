"""One listening node per spool and per port, with real `dicomnode` processes.

With ``listener.processes > 1`` the port is bound with SO_REUSEPORT, which the kernel
grants to any process of the same user: without a lock of its own, a second node with
another spool and database binds the same port and takes half of the associations.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

from tests.conftest import wait_for
from tests.integration.node_process import NodeProcess, listener_port, write_config

HOLDER = r"pid (\d+) on host \S+, started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def node_config(folder: Path, *, port: int | None = None, spool: Path | None = None) -> Path:
    """A node of its own (SQLite database in ``folder``), two receiver processes."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(
        folder,
        db_url=f"sqlite:///{folder / 'dicomnode.db'}",
        pacs_port=9,
        quiet_seconds=3600,
        port=port,
        listener_extra="processes = 2",
        spool=spool,
    )


def refused(node: NodeProcess) -> str:
    """Start ``node``; return its one error line once it has exited non-zero."""
    node.start()
    assert node.proc is not None
    # Bounded: either it exits, or it serves (the bug: then this fails, not hangs).
    assert wait_for(lambda: node.proc.poll() is not None or "serving:" in node.log(), 120)
    assert "serving:" not in node.log(), node.log()
    assert node.proc.wait(30) != 0
    errors = [line for line in node.log().splitlines() if line.startswith("dicomnode: ")]
    assert len(errors) == 1, node.log()
    return errors[0]


def assert_held_by(line: str, message: str, holder: NodeProcess) -> None:
    """Assert that ``line`` is all of ``message`` and names ``holder``'s pid.

    ``message`` is a regex holding HOLDER, whose pid is its first group.
    """
    match = re.fullmatch(message, line)
    assert match is not None, line
    assert holder.proc is not None and match.group(1) == str(holder.proc.pid), line


def test_a_second_node_on_the_same_port_is_refused_until_the_first_is_killed(
    tmp_path: Path,
) -> None:
    first = NodeProcess(node_config(tmp_path / "a"))
    with first:
        assert first.proc is not None
        port = listener_port(first.config)
        # Another database and another spool: only the port is shared.
        second = NodeProcess(node_config(tmp_path / "b", port=port))
        try:
            assert_held_by(
                refused(second),
                rf"dicomnode: listener port {port} is in use by another dicomnode on this "
                rf"host \({HOLDER}\); one node per port",
                first,
            )
            assert first.proc.poll() is None  # the first node is untouched

            # kill -9 leaves no stale lock: the kernel released both with the process.
            first.kill()
            with NodeProcess(second.config, log_name="second-start.log"):
                pass
        finally:
            second.stop()


def test_a_second_node_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    first = NodeProcess(node_config(tmp_path / "a"))
    with first:
        assert first.proc is not None
        spool = tmp_path / "a" / "spool"
        # Another port and another database: only the spool is shared. `listen` takes
        # the same locks as `serve`.
        second = NodeProcess(node_config(tmp_path / "b", spool=spool), command="listen")
        try:
            line = refused(second)
        finally:
            second.stop()
        assert_held_by(
            line,
            rf"dicomnode: storage.path {re.escape(str(spool))} is in use by another "
            rf"listening dicomnode \({HOLDER}\); one listening node per spool",
            first,
        )


def test_workers_share_the_spool_with_its_listener(tmp_path: Path) -> None:
    """The documented scale-out: `dicomnode worker` processes beside the listener."""
    config = node_config(tmp_path / "a")
    with (
        NodeProcess(config, command="listen"),
        NodeProcess(config, log_name="worker.log", command="worker") as worker,
    ):
        assert "in use by" not in worker.log()


def test_the_descriptor_limit_is_raised_and_logged(tmp_path: Path) -> None:
    config = node_config(tmp_path / "a")

    def low_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    node = NodeProcess(config, command="listen")
    node.preexec = low_soft
    with node:
        pass
    assert (
        "descriptor limit 4096 (listener.max_associations=32 and max_pending_connections=256 "
        "need 448)" in node.log()
    ), node.log()

    def low_hard() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    node = NodeProcess(config, log_name="low.log", command="listen")
    node.preexec = low_hard
    with node:
        pass
    assert (
        "descriptor limit 200 is below the 448 that listener.max_associations=32 and "
        "max_pending_connections=256 need" in node.log()
    ), node.log()
