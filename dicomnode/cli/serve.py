"""``dicomnode serve``, ``listen`` and ``worker``: run the node; ``config check``: could it run.

Imported only when one of these runs: the node brings torch, pynetdicom and the
database layer with it.
"""

from __future__ import annotations

import argparse

from dicomnode.config import Settings
from dicomnode.node import check_configuration, serve_until_signal

EXIT_OK = 0


def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the node with the roles the command names until SIGINT or SIGTERM.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    args : argparse.Namespace
        ``listen`` and ``work``: the roles (``serve`` both, ``listen``, ``worker``).

    Returns
    -------
    int
        0 once the node stopped on a signal.
    """
    serve_until_signal(settings, listen=args.listen, work=args.work)
    return EXIT_OK


def check_config(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode config check``: what the node needs to start, without starting it.

    Parameters
    ----------
    settings : Settings
        The settings to check.
    args : argparse.Namespace
        Unused.

    Returns
    -------
    int
        0 when the configuration is usable (otherwise the check raises).
    """
    models = check_configuration(settings)
    print(
        f"configuration ok: {settings.source or 'built-in defaults'}; "
        f"{len(settings.routes)} route(s), {len(settings.destinations)} destination(s), "
        f"models: {', '.join(sorted(models)) or 'none'}"
    )
    return EXIT_OK
