"""Logging: one line per event, UIDs and ids only, whoever supplied the text.

Two formats (``logging.format``): ``text``, one line per event whose message carries
``key=value`` fields, and ``json``, one JSON object per line with the time, level,
logger and message and, where the code passes them as ``extra`` (job outcomes do:
``job_id``, ``model``, ``outcome``, ``attempt``, ``seconds``, ``stages``), the same
fields as JSON values, so that a log collector can chart durations without parsing.

AE titles, addresses and error messages can come from any device on the network. A
newline or a carriage return in one would end our log line and start a forged one
("... INFO dicomnode: stored ..."), and terminal escape sequences could rewrite what
an admin sees in ``journalctl``. Everything that is not printable is shown as a
Python escape instead, so a log line is always exactly one line and says what was
received: :func:`printable` for whole log lines (the text formatter applies it to
every message), :func:`shown` for a peer's string quoted inside a message or an
audit entry.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

# C0 and C1 controls and the Unicode line and paragraph separators; a backslash
# stays as it is (log readers see "\n" typed by a peer and a real newline escaped
# the same way, but only the real one could have started a forged line).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def printable(text: object) -> str:
    r"""Return ``text`` with control characters escaped.

    Parameters
    ----------
    text : object
        Anything; it is converted with ``str`` first.

    Returns
    -------
    str
        One line: ``CT\nFORGED`` for a title that held a newline.

    Examples
    --------
    >>> printable("CT01\n2026-01-01 INFO forged")
    'CT01\\n2026-01-01 INFO forged'
    """
    return _UNPRINTABLE.sub(_escape, str(text))


def shown(text: object) -> str:
    r"""Return a peer-supplied string as it may appear in a log line or an audit entry.

    Repr-style and ASCII only: a control character (a newline that would forge a log
    line, an escape sequence for the terminal) arrives as ``\n`` or ``\x1b``, and
    the quotes show where the peer's string begins and ends.

    Parameters
    ----------
    text : object
        An AE title or another string a peer sent.

    Returns
    -------
    str
        The quoted, escaped form.

    Examples
    --------
    >>> shown("CT01\n")
    "'CT01\\n'"
    """
    return ascii(str(text))


# UTC, like every time the CLI prints and the database stores: one clock to compare.
FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
# systemd's journal reads a "<N>" prefix on a line as its syslog priority, so that
# `journalctl -p warning` works; JOURNAL_STREAM is set when stderr is the journal.
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class TextFormatter(logging.Formatter):
    """One line per event in UTC, with a journald priority prefix under systemd.

    A message is always one line: control characters in it are escaped (see
    :func:`dicomnode.logs.printable`), whoever supplied them. AE titles and
    other strings from the network reach messages in many places, pynetdicom's own
    among them, and a newline in one would otherwise start a line of the peer's
    choosing. A traceback below a message is indented, so that no line of it can
    pass for an event of its own either.
    """

    converter = staticmethod(time.gmtime)

    def __init__(self, journal: bool) -> None:
        super().__init__(FORMAT, DATE_FORMAT)
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """Return the line for the record's message, its control characters escaped.

        Parameters
        ----------
        record : logging.LogRecord
            The record, its ``message`` already formatted.

        Returns
        -------
        str
            The line.
        """
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        """Return the traceback, indented and with control characters escaped.

        Parameters
        ----------
        ei : tuple
            ``sys.exc_info()``.

        Returns
        -------
        str
            The traceback's lines, each starting with two spaces.
        """
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        """Return a stack dump, indented like a traceback.

        Parameters
        ----------
        stack_info : str
            The stack as :mod:`traceback` printed it.

        Returns
        -------
        str
            Its lines, each starting with two spaces.
        """
        return _indented(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        """Return the line, prefixed with ``<priority>`` when writing to the journal.

        Parameters
        ----------
        record : logging.LogRecord
            The record.

        Returns
        -------
        str
            The line (and a traceback below it, if any).
        """
        line = super().format(record)
        if self.journal:
            return f"<{_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def _indented(text: str) -> str:
    return "\n".join("  " + printable(line) for line in text.splitlines())


# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """Format a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as JSON: time, level, logger, message and its extra fields.

        Parameters
        ----------
        record : logging.LogRecord
            The record.

        Returns
        -------
        str
            One line.
        """
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _stderr_is_the_journal() -> bool:
    # systemd sets JOURNAL_STREAM to the device and inode of the journal's stream; a
    # child whose stderr went elsewhere (a file, a pipe) inherits the variable too.
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str, fmt: str = "text", *, reads_dicom: bool = True) -> None:
    """Send logs to stderr at ``level``, as text or JSON lines.

    pynetdicom and APScheduler are kept at WARNING unless DEBUG is asked for:
    their INFO lines are noise at a busy node, and pynetdicom's DEBUG output can
    include dataset contents, so it is only ever shown when explicitly requested.

    Parameters
    ----------
    level : str
        DEBUG, INFO, WARNING or ERROR.
    fmt : str
        ``text`` or ``json``.
    reads_dicom : bool
        Whether the process may read DICOM: then pydicom is loaded now and kept from
        quoting values (:func:`keep_phi_out_of_logs`). A CLI command that only reads the
        database passes False and starts without pydicom's import time.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    journal = _stderr_is_the_journal()
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(journal))
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(name).setLevel(quiet)
    if reads_dicom or "pydicom" in sys.modules:
        keep_phi_out_of_logs()


def keep_phi_out_of_logs() -> None:
    """Stop pydicom from quoting received values in warnings and log lines.

    pydicom validates values as it reads them and, by default, warns with the value
    itself ("Invalid value for VR DA: '1970013'"), which may be a birth date or a
    patient name sent by a scanner. dicomnode checks what it relies on (UIDs, pixel
    data) itself and reports problems with ids only, so reading validation is off.
    """
    import pydicom.config  # here, not at the top: most CLI commands never load pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
