"""Log set-up for the command line: one line per event, UIDs and ids only."""

from __future__ import annotations

import logging
import sys

import pydicom

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Send logs to stderr at ``level``.

    pynetdicom and APScheduler are kept at WARNING unless DEBUG is asked for:
    their INFO lines are noise at a busy node, and pynetdicom's DEBUG output can
    include dataset contents, so it is only ever shown when explicitly requested.

    Parameters
    ----------
    level : str
        DEBUG, INFO, WARNING or ERROR.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(name).setLevel(quiet)
    keep_phi_out_of_logs()


def keep_phi_out_of_logs() -> None:
    """Stop pydicom from quoting received values in warnings and log lines.

    pydicom validates values as it reads them and, by default, warns with the value
    itself ("Invalid value for VR DA: '1970013'"), which may be a birth date or a
    patient name sent by a scanner. dicomnode checks what it relies on (UIDs, pixel
    data) itself and reports problems with ids only, so reading validation is off.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
