"""Exception hierarchy.

Every error the node raises on purpose derives from :class:`DicomnodeError`.
Job errors say whether a retry can help: a :class:`PermanentJobError` fails the
job at once, a :class:`TransientJobError` is retried with backoff. Ingest
errors are mapped to C-STORE statuses by ``dicomnode.dimse.statuses``.
"""

from __future__ import annotations

import errno


class DicomnodeError(Exception):
    """Base class of every error dicomnode raises on purpose."""


class ConfigError(DicomnodeError):
    """A setting is unknown or has a bad value; the message names the key."""


class DatabaseNotFound(DicomnodeError):
    """The SQLite file a command only reads (or updates) does not exist.

    Only ``dicomnode db upgrade`` and the commands that run the node create the
    database; every other command stops with this instead of leaving an empty file.
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"database not found: {path}")
        self.path = path


class ModelPackageError(DicomnodeError):
    """A model package under ``models/`` is incomplete or inconsistent."""


class NodeAlreadyRunning(DicomnodeError):
    """Another node listens on this spool or this port; the message names its process."""


class JobError(DicomnodeError):
    """Base class of errors that end one attempt of a job."""

    retryable: bool = False


class PermanentJobError(JobError):
    """Retrying cannot help: an unreadable series, an input the model cannot take."""

    retryable = False


class TransientJobError(JobError):
    """Retrying later may help: the PACS is down, the GPU is out of memory."""

    retryable = True


class DeliveryFailed(TransientJobError):
    """The results are made and stored, but a destination did not take them yet.

    Retried on the delivery schedule (for hours), not the model's attempt budget.
    """


# How every error of a full disk begins (``last_error``, the job's history): the worker
# retries them by time, and the failures in a row that start so tell for how long.
# The messages spell it out, so that docs/troubleshooting.md's test finds them.
DISK_FULL = "no space left on device"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ResultsDiskFull(TransientJobError):
    """The spool's disk (or the user's quota on it) was full when results were written.

    Retried by time, not by attempts (see :class:`dicomnode.db.jobs.ResourceRetry`):
    space comes back when retention or an admin frees it, however long that takes.
    """


def is_disk_full(exc: BaseException) -> bool:
    """Return whether ``exc`` says a disk or a quota is full (ENOSPC, EDQUOT).

    Parameters
    ----------
    exc : BaseException
        What a write raised.

    Returns
    -------
    bool
        True for a full disk or quota.
    """
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS


class JobSuperseded(JobError):
    """Newer input made the job pointless (a late instance re-opened its series).

    The job is cancelled, not failed: a newer job for the same series replaces it.
    """


class ContentCheckFailed(JobError):
    """The series is not what the route's models are for; the job is cancelled.

    Too few slices, not axial, or another model found nothing: the reason says which.
    """


class Waiting(JobError):
    """The job needs something that is not there yet; it waits ``seconds`` and tries again.

    The job goes back to the queue for a while; the attempt does not count.
    """

    retryable = True

    def __init__(self, message: str, seconds: float = 5.0) -> None:
        super().__init__(message)
        self.seconds = seconds


class WaitingForModel(Waiting):
    """The route needs another model's verdict on the series, and it is not in yet."""


class WaitingForPriors(Waiting):
    """The PACS that holds the priors is down or did not answer; the job asks again later.

    Only for the route's ``priors.wait_seconds``: then the job runs without priors.
    """


class JobInterrupted(DicomnodeError):
    """The worker is shutting down; the job goes back to the queue untouched."""


class IngestError(DicomnodeError):
    """An incoming instance is refused; ``net.status`` maps each subclass to a DICOM status.

    The message is one line without PHI: it goes to the log and, as the Error
    Comment, back to the sender.
    """


class UnreadableInstance(IngestError):
    """The bytes do not parse as a DICOM dataset."""


class MissingAttribute(IngestError):
    """A UID we need (SOP Instance, Study, Series, SOP Class) is absent or empty."""


class InvalidUID(IngestError):
    """A UID is malformed or unsafe to use as a path component."""


class UIDMismatch(IngestError):
    """The dataset's SOP Instance UID differs from the one in the C-STORE request."""


class SOPClassMismatch(IngestError):
    """The dataset's SOP Class UID differs from the one negotiated for it."""


class OutOfResources(IngestError):
    """The disk or the database cannot take the instance right now; the sender may retry."""


class RecordRefused(IngestError):
    """The database refuses the instance's row for a reason a retry cannot change.

    A constraint, a value or the schema, not a lost connection or a full disk: the
    sender hears a failure (0x0110), not "out of resources", which would have it
    retry the same instance for ever.
    """


class InstanceTooLarge(OutOfResources):
    """The instance is larger than ``storage.max_instance_mb``."""


class StorageLow(OutOfResources):
    """Free space on the spool's disk is below ``storage.min_free_mb``."""


class HeaderUnavailable(DicomnodeError):
    """No instance header of the series can be read right now; try the next sweep."""


class Disagreement(DicomnodeError):
    """The faster back-end's first batch did not match PyTorch's."""


class JobStateError(DicomnodeError, LookupError):
    """An admin action that the job's state does not allow (the CLI's one-line error)."""


class EvaluationError(DicomnodeError):
    """A case that cannot be compared: one line, naming the file and the problem."""


class UsageError(EvaluationError):
    """An option given wrongly (``dicomnode evaluate`` exits 2 on it)."""


class LidcError(DicomnodeError):
    """An LIDC XML file that cannot be read, or that does not match the series."""


class UnusableSeg(DicomnodeError):
    """A SEG that cannot stand in for the labels of a volume; the message says why.

    The message names no UID or patient data: it goes to the log.
    """


class PreviewError(DicomnodeError):
    """The preview cannot be made: no SEG yet, files missing, or the path is unwritable."""


class ExportMismatch(DicomnodeError):
    """An export does not hold every entry a prune would delete, exactly as stored."""


def first_line(message: object) -> str:
    """Return the first non-empty line of a message, stripped; ``""`` when it has none.

    Error messages shown on one line (a job's error, a CLI's stderr, an audit row)
    come from exceptions whose text may be empty or start with a blank line:
    ``str(exc).splitlines()[0]`` would raise IndexError on them.

    Parameters
    ----------
    message : object
        A message, or an exception (its ``str``).

    Returns
    -------
    str
        The first line with text on it, or ``""``.
    """
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "")


def os_reason(exc: OSError) -> str:
    """Return why reading or writing failed, without the path (``ENOENT``, ``EACCES``).

    Parameters
    ----------
    exc : OSError
        The error.

    Returns
    -------
    str
        The errno's name, or the exception's type when it has none.
    """
    return errno.errorcode.get(exc.errno or 0) or type(exc).__name__
