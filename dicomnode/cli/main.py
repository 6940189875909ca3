"""The ``dicomnode`` command.

Exit codes: 0 success, 1 the operation failed (a peer did not answer, no such
job; for ``status``: something needs attention), 2 bad usage or configuration.
Errors, usage errors included, are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from dicomnode.cli.parser import build_parser
from dicomnode.config import ENV_CONFIG, Settings, load_settings
from dicomnode.errors import (
    ConfigError,
    DatabaseNotFound,
    DicomnodeError,
    ModelPackageError,
    UsageError,
    first_line,
)
from dicomnode.logs import setup_logging

log = logging.getLogger("dicomnode")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# The built-in database URL is overridden by this variable alone, without a file.
ENV_DATABASE_URL = "DICOMNODE_DATABASE_URL"


def config_path(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the configuration file a command line names, or None for the defaults.

    Precedence: ``--config`` after the command, ``--config`` before it,
    ``$DICOMNODE_CONFIG``, and else none (built-in defaults).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.
    environ : Mapping[str, str], optional
        Environment to read; ``os.environ`` if omitted.

    Returns
    -------
    str or None
        The path, or None.
    """
    env = os.environ if environ is None else environ
    chosen: str | None = getattr(args, "config_after", None) or args.config or env.get(ENV_CONFIG)
    return chosen or None


def _no_database(settings: Settings, exc: DatabaseNotFound) -> tuple[str, int]:
    """Return the one-line error for a missing database, and the exit code."""
    if settings.source is None and not os.environ.get(ENV_DATABASE_URL):
        # No configuration anywhere: the likeliest cause is a command run outside the
        # node's folder, and `db upgrade` here would only make a second, empty database.
        return (
            f"no configuration given and no database at {exc.path}: pass --config FILE "
            f"(before or after the command) or set {ENV_CONFIG}=FILE"
        ), EXIT_USAGE
    # A configured database that is not there yet: failed, like an unmigrated one.
    return f"{exc}: check database.url, or run `dicomnode db upgrade` to create it", EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dicomnode`` command.

    Parameters
    ----------
    argv : Sequence[str], optional
        Arguments without the program name; ``sys.argv[1:]`` if omitted.

    Returns
    -------
    int
        The exit code.
    """
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(config_path(args))
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(
        args.log_level or settings.logging.level,
        settings.logging.format,
        # Every subcommand's function is a Command, which says whether it reads DICOM.
        reads_dicom=args.run.reads_dicom,
    )
    try:
        return int(args.run(settings, args))
    except DatabaseNotFound as exc:
        message, code = _no_database(settings, exc)
        print(f"dicomnode: {message}", file=sys.stderr)
        return code
    except (ConfigError, ModelPackageError) as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:  # an option no parser could check (evaluate's label map)
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"dicomnode: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_FAILED
    except DicomnodeError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # `dicomnode audit export | head`: the reader has what it wanted. Point stdout
        # at /dev/null so that the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        # A database that is down, a full disk: still one line, with the detail at DEBUG.
        log.debug("unexpected error", exc_info=True)
        print(
            f"dicomnode: {type(exc).__name__}: {first_line(exc)}",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
