"""``dicomnode jobs show ID --preview out.png``: a PNG montage of a job's SEG over its source.

The command checks the target, reads the job (:func:`dicomnode.db.queries.preview_source`),
prints it as ``jobs show`` does and saves what
:func:`dicomnode.pipeline.preview.render_job_preview` draws.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dicomnode.cli.database import read
from dicomnode.cli.job_output import print_job
from dicomnode.config import Settings
from dicomnode.db import queries
from dicomnode.errors import PreviewError
from dicomnode.pipeline import preview_seg_path, render_job_preview
from dicomnode.store import Spool


def check_target(path: Path) -> None:
    """Refuse a PNG path that cannot be written, before any work is done.

    Parameters
    ----------
    path : Path
        Where the PNG is to go.

    Raises
    ------
    PreviewError
        If its folder is missing or not writable, or the path is a folder.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PreviewError(f"cannot write the preview to {path}: it is a directory")
    if not folder.is_dir():
        raise PreviewError(f"cannot write the preview to {path}: no directory {folder}")
    if not os.access(folder, os.W_OK):
        raise PreviewError(f"cannot write the preview to {path}: {folder} is not writable")


def show_job_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode jobs show ID --preview PNG``: print the job, write the PNG.

    A plain ``jobs show`` never comes here (:func:`dicomnode.cli.dispatch.show_job`),
    so that it loads none of the drawing code.

    Parameters
    ----------
    settings : Settings
        The database and the spool.
    args : argparse.Namespace
        ``id``, ``json``, ``show_phi`` and ``preview`` (the PNG's path).

    Returns
    -------
    int
        Exit code 0; an unknown job, a job without a SEG or an unwritable path raise a
        one-line error (exit code 1).
    """
    target: Path = args.preview
    phi = bool(getattr(args, "show_phi", False))
    source = read(settings, queries.preview_source, args.id, show_phi=phi)
    # Everything that can be refused is refused before anything is printed.
    check_target(target)
    preview_seg_path(source)
    code = print_job(source.detail, args)
    image, count = render_job_preview(Spool(settings.storage.path, create=False), source)
    try:
        image.save(target, format="PNG")
    except OSError as exc:
        raise PreviewError(f"cannot write the preview to {target}: {exc.strerror or exc}") from None
    message = f"preview       {target} ({count} slices, {image.width}x{image.height})"
    if args.json:  # stdout holds the JSON record alone
        print(message, file=sys.stderr)
    else:
        print(message)
    return code
