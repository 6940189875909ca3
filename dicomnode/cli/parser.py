"""The ``dicomnode`` argument parser: the global options and every subcommand.

Building it imports no command's code: each subcommand names its function as a
:class:`~dicomnode.cli.commands.Command`, imported when it runs, so that
``dicomnode --help`` and the light commands start without sqlalchemy, pydicom,
pynetdicom or torch. Commands whose parsers are long are declared in
:mod:`dicomnode.cli.subcommands`.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dicomnode
from dicomnode.cli import subcommands
from dicomnode.cli.arguments import add_when, parse_duration, positive_int
from dicomnode.cli.commands import Command
from dicomnode.cli.subcommands import ended_state, job_state
from dicomnode.config import ENV_CONFIG

EXIT_USAGE = 2

CONFIG_HELP = (
    f"TOML configuration file, before or after the command (default: ${ENV_CONFIG}, "
    "else built-in defaults with the database at ./var/dicomnode.db)"
)
# ``serve``, ``listen`` and ``worker``: one node with different roles. It receives and
# reads DICOM, so logging quietens pydicom before it starts.
SERVE = Command("dicomnode.cli.serve:serve", reads_dicom=True)


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
    p.set_defaults(run=SERVE, listen=True, work=True)
    p = sub.add_parser(
        "listen", help="only receive: the listener and the completion sweep (no models run)"
    )
    p.set_defaults(run=SERVE, listen=True, work=False)
    p = sub.add_parser("worker", help="only run jobs: workers sharing the database and spool")
    p.set_defaults(run=SERVE, listen=False, work=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    db.add_parser("upgrade", help="apply migrations up to the newest").set_defaults(
        run=Command("dicomnode.cli.database:db_upgrade", reads_dicom=True)
    )

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
    p.set_defaults(run=Command("dicomnode.cli.jobs:list_jobs"))
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
    p.set_defaults(run=Command("dicomnode.cli.dispatch:show_job", reads_dicom=True))
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

    subcommands.register_evaluate(sub)

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
        subcommands.register_studies,
        subcommands.register_destinations,
        subcommands.register_transfer,
        subcommands.register_retention,
        subcommands.register_audit,
    ):
        register(sub)

    p = sub.add_parser("echo", help="C-ECHO a configured destination")
    p.add_argument("destination", metavar="DESTINATION_NAME", help="a [[destinations]] name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=Command("dicomnode.cli.dispatch:echo", reads_dicom=True))

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    config.add_parser(
        "check", help="validate the configuration and the model packages"
    ).set_defaults(run=Command("dicomnode.cli.serve:check_config", reads_dicom=True))
    _accept_config_after_command(parser)
    return parser


def _accept_config_after_command(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand its own ``-c/--config`` (``dicomnode serve --config x.toml``).

    It has its own destination, ``config_after``, and no default: the global option
    before the command is kept when it is not repeated, and wins otherwise
    (:func:`dicomnode.cli.main.config_path`).
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
