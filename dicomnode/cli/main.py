"""The ``dicomnode`` command.

Exit codes: 0 success, 1 the operation failed (a peer did not answer, no such
job; for ``status``: something needs attention), 2 bad usage or configuration.
Errors, usage errors included, are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import dicomnode
from dicomnode.cli import parsers
from dicomnode.cli.arguments import add_when, parse_duration, positive_int
from dicomnode.cli.commands import Command
from dicomnode.cli.parsers import ended_state, job_state
from dicomnode.config import ENV_CONFIG, Settings, load_settings
from dicomnode.errors import (
    ConfigError,
    DatabaseNotFound,
    DicomnodeError,
    ModelPackageError,
)
from dicomnode.logs import setup_logging

if TYPE_CHECKING:
    from dicomnode.node import Node

log = logging.getLogger("dicomnode")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from dicomnode.node import Node  # imports torch: only for the commands that need it

    node = Node.from_settings(settings, listen=args.listen, work=args.work)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _run_until(node, settings, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


def _run_until(node: Node, settings: Settings, stop: threading.Event) -> None:
    try:
        node.start()
    except BaseException:
        node.stop()  # whatever did start (scheduler, threads, database pool) stops again
        raise
    log.info(
        "dicomnode %s serving: listener=%s workers=%d models=%s",
        dicomnode.__version__,
        f"{settings.listener.ae_title}@{node.listener.port}" if node.listener else "off",
        len(node.workers),
        (",".join(sorted(node.models)) if node.workers else "") or "-",
    )
    while not stop.wait(1.0):
        pass
    node.stop()


def _db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from dicomnode.db import migrate
    from dicomnode.db.engine import make_engine

    engine = make_engine(settings.database.url)  # the one command that creates it
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    print(f"database at revision {after} (was {before or 'empty'})")
    return EXIT_OK


def _show_job(settings: Settings, args: argparse.Namespace) -> int:
    if args.preview is None:
        return Command("dicomnode.cli.jobs:show_job", session=True)(settings, args)
    from dicomnode.cli.preview import show_job_command  # highdicom and Pillow: only here

    return show_job_command(settings, args)


def _echo(settings: Settings, args: argparse.Namespace) -> int:
    # `echo NAME` is `destinations echo NAME`: one function, one output format.
    from dicomnode.cli.destinations import echo_destinations

    args.names = [args.destination]
    return echo_destinations(settings, args)


def _config_check(settings: Settings, args: argparse.Namespace) -> int:
    from dicomnode.imaging.manifest import load_registry
    from dicomnode.listener.scp import make_ssl_context
    from dicomnode.node import check_routes

    models = load_registry(settings.models.path)
    check_routes(settings, models)
    make_ssl_context(settings.listener)  # TLS files exist and load
    print(
        f"configuration ok: {settings.source or 'built-in defaults'}; "
        f"{len(settings.routes)} route(s), {len(settings.destinations)} destination(s), "
        f"models: {', '.join(sorted(models)) or 'none'}"
    )
    return EXIT_OK


class _Version(argparse.Action):
    """``--version``: reads the installed version only when asked (it is slow to read)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", 0)
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.exit(message=f"dicomnode {dicomnode.__version__}\n")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        """Print ``PROG: error: MESSAGE`` without the usage block and exit with 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``dicomnode`` command.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = _Parser(
        prog="dicomnode",
        description="Receive DICOM studies, run AI models on them, send SEG and SR results back.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    parser.add_argument("-c", "--config", metavar="PATH", help=CONFIG_HELP)
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="override logging.level from the configuration",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run listener, scheduler and workers in one process")
    p.set_defaults(run=_serve, listen=True, work=True)
    p = sub.add_parser(
        "listen", help="only receive: the listener and the completion sweep (no models run)"
    )
    p.set_defaults(run=_serve, listen=True, work=False)
    p = sub.add_parser("worker", help="only run jobs: workers sharing the database and spool")
    p.set_defaults(run=_serve, listen=False, work=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    db.add_parser("upgrade", help="apply migrations up to the newest").set_defaults(run=_db_upgrade)

    jobs = sub.add_parser("jobs", help="inspect, retry and cancel jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="COMMAND"
    )
    p = jobs.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", type=job_state, help="only jobs in this state")
    p.add_argument("--route", help="only jobs of this route")
    p.add_argument("--model", help="only jobs of this model")
    add_when(p, "--since", "only jobs created since")
    p.add_argument("--study", metavar="UID", help="only jobs of this Study Instance UID")
    p.add_argument("--accession", metavar="NUMBER", help="only jobs of this accession number")
    p.add_argument("--limit", type=positive_int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--show-phi", action="store_true", help="also print patient IDs and accession numbers"
    )
    p.set_defaults(run=Command("dicomnode.cli.jobs:list_jobs", session=True))
    p = jobs.add_parser("show", help="show one job: state, timings per stage, outputs, error")
    p.add_argument("id", type=int, help="job id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--show-phi", action="store_true", help="also print the patient ID and accession number"
    )
    p.add_argument(
        "--preview",
        type=Path,
        metavar="PNG",
        help="also write a PNG montage of the job's SEG over its source, with measurements",
    )
    p.set_defaults(run=_show_job)
    p = jobs.add_parser("retry", help="queue ended jobs again (failed, cancelled or done)")
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="job ids")
    p.set_defaults(run=Command("dicomnode.cli.jobs:retry_jobs"))
    p = jobs.add_parser("cancel", help="cancel queued or running jobs")
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="job ids")
    p.set_defaults(run=Command("dicomnode.cli.jobs:cancel_jobs"))
    p = jobs.add_parser(
        "purge",
        help="delete ended jobs older than an age: their rows and result files",
    )
    p.add_argument("--state", type=ended_state, required=True, help="done, failed or cancelled")
    p.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="AGE",
        help="ended longer ago than AGE, e.g. 30d, 12h, 2w",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be purged")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.jobs:purge_jobs"))

    models = sub.add_parser("models", help="installed model packages").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND"
    )
    p = models.add_parser("list", help="list the installed model packages")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.models:list_models"))
    p = models.add_parser("show", help="show one package: input contract, outputs, licence")
    p.add_argument("name", help="model name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.models:show_model"))
    p = models.add_parser("check", help="load the weights and run one batch on the CPU")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: all)")
    p.set_defaults(run=Command("dicomnode.cli.models:check_models", reads_dicom=True))

    p = sub.add_parser(
        "evaluate",
        help="compare our SEGs and findings with references (SEG, NIfTI, LIDC XML)",
        description="Compare our SEGs (Dice, IoU, HD95, volumes) and findings (sensitivity, "
        "precision, FROC, CPM, AUC) with reference DICOM SEGs, NIfTI label volumes or LIDC "
        "XML annotations, per case and overall.",
    )
    p.add_argument("ours", type=Path, help="our SEG (or findings JSON) file, or a folder of them")
    p.add_argument(
        "reference", type=Path, help="reference SEG, NIfTI (.nii/.nii.gz) or LIDC XML, or a folder"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--images",
        type=Path,
        action="append",
        metavar="DIR",
        help="source series folder, for LIDC and NIfTI geometry and plot backgrounds (repeatable)",
    )
    p.add_argument(
        "--label-map",
        action="append",
        metavar='N="LABEL"',
        help="NIfTI label value N is our segment LABEL (repeatable, or comma-separated); "
        "default: value N is segment number N",
    )
    p.add_argument(
        "--segment", metavar="LABEL", help="LIDC: our segment to compare (default: any *nodule*)"
    )
    p.add_argument(
        "--findings",
        type=Path,
        metavar="FILE.json",
        help='LIDC detection: a JSON list of {"center": [x, y, z] (LPS mm), "diameter_mm", '
        '"probability"}, or an object of series UID -> such lists',
    )
    p.add_argument(
        "--min-readers",
        type=int,
        default=1,
        metavar="N",
        help="LIDC: nodules (and outline voxels) marked by at least N readers (default 1)",
    )
    p.add_argument(
        "--include-small",
        action="store_true",
        help="LIDC detection: also nodules no reader outlined (< 3 mm)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="detection: findings with probability >= this count (default 0.5)",
    )
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar on stderr (default: only when stderr is a terminal "
        "and --json is not given)",
    )
    p.set_defaults(run=Command("dicomnode.cli.evaluate:evaluate", reads_dicom=True))

    p = sub.add_parser(
        "status",
        help="the node's health: listener, workers, queue, deliveries, disk, last errors",
        description="Exit code 0 when healthy; 1 when something needs attention: the "
        "listener does not answer, the spool's disk is below storage.min_free_mb, deliveries "
        "failed, or jobs failed in the last hour.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--no-listener",
        action="store_true",
        help="do not C-ECHO the listener (a host that runs only workers)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long the listener has to answer the C-ECHO (default 3)",
    )
    p.set_defaults(run=Command("dicomnode.cli.status:status"))

    # Commands that live with their code register their own parsers.
    for register in (
        parsers.register_studies,
        parsers.register_destinations,
        parsers.register_transfer,
        parsers.register_retention,
        parsers.register_audit,
    ):
        register(sub)

    p = sub.add_parser("echo", help="C-ECHO a configured destination")
    p.add_argument("destination", metavar="DESTINATION_NAME", help="a [[destinations]] name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_echo)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    config.add_parser(
        "check", help="validate the configuration and the model packages"
    ).set_defaults(run=_config_check)
    _accept_config_after_command(parser)
    return parser


# The built-in database URL is overridden by this variable alone, without a file.
ENV_DATABASE_URL = "DICOMNODE_DATABASE_URL"
CONFIG_HELP = (
    f"TOML configuration file, before or after the command (default: ${ENV_CONFIG}, "
    "else built-in defaults with the database at ./var/dicomnode.db)"
)


def _accept_config_after_command(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand its own ``-c/--config`` (``dicomnode serve --config x.toml``).

    It has its own destination, ``config_after``, and no default: the global option
    before the command is kept when it is not repeated, and wins otherwise
    (:func:`config_path`).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                if any(a.dest == "config_after" for a in sub._actions):
                    continue
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    _accept_config_after_command(sub)
                    continue
                sub.add_argument(
                    "-c",
                    "--config",
                    dest="config_after",
                    metavar="PATH",
                    default=argparse.SUPPRESS,
                    help=CONFIG_HELP,
                )


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
        # A plain function (the node, transfers) may read DICOM; a Command says.
        reads_dicom=getattr(args.run, "reads_dicom", True),
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
            f"dicomnode: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
