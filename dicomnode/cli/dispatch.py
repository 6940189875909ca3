"""Commands that hand over to another command's function.

``jobs show --preview`` needs highdicom and Pillow, which a plain ``jobs show`` should
not load; ``echo NAME`` is ``destinations echo NAME`` under a shorter name, with one
function and one output format for both.
"""

from __future__ import annotations

import argparse

from dicomnode.config import Settings


def show_job(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode jobs show ID``, with the preview's code only for ``--preview``.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    args : argparse.Namespace
        The subcommand's options.

    Returns
    -------
    int
        The exit code of the command run.
    """
    if args.preview is None:
        from dicomnode.cli.jobs import show_job

        return show_job(settings, args)
    from dicomnode.cli.preview import show_job_command  # highdicom and Pillow: only here

    return show_job_command(settings, args)


def echo(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode echo NAME`` as ``dicomnode destinations echo NAME``.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    args : argparse.Namespace
        ``destination``: the name.

    Returns
    -------
    int
        The exit code of ``destinations echo``.
    """
    from dicomnode.cli.destinations import echo_destinations

    args.names = [args.destination]
    return echo_destinations(settings, args)
