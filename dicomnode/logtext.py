"""Text that is safe to put on a log line, whoever wrote it.

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

import re

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
