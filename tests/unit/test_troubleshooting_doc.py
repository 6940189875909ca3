"""docs/troubleshooting.md quotes the node's messages: they must still be in the code.

Each fragment is a literal part of a message the doc quotes (the parts that do not
vary). When a message changes in the code, this test names the fragment, so the doc
is updated with it instead of sending an admin looking for a line that no longer
exists.
"""

from __future__ import annotations

from functools import cache

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "troubleshooting.md"
SOURCE = REPO / "dicomnode"

FRAGMENTS = [
    # the listener: associations and C-STORE refusals
    "association accepted calling_ae=",
    "association rejected calling_ae=",
    "TLS handshake failed peer=",
    "connections dropped before association in the last ",
    "pynetdicom is not the version dicomnode was tested with: ",
    " (tested: ",
    "; busiest peer=",
    " bytes refused (longer than the ",
    " we announced): association aborted peer=",
    "store refused sop_uid=",
    "storage is below its free-space watermark",
    "storage is full",
    "cannot write to storage (",
    "exceeds storage.max_instance_mb",
    "deflated dataset inflates beyond 256 MiB",
    "no connection free in the pool",
    "database refused the instance's row (",
    "PixelData is native but the transfer syntax ",
    "PixelData is encapsulated but the transfer syntax ",
    "deflated dataset cannot be inflated",
    "deflated dataset has more than ",
    "deflated dataset is truncated",
    " has no valid VR",
    " has no end (truncated)",
    "sequences nested deeper than ",
    "index values adjusted sop_uid=",
    " is out of range (not indexed)",
    "has a NUL character",
    "is not an integer",
    "index values refused by the database sop_uid=",
    "dataset SOPClassUID differs from the negotiated SOP class",
    "runs past the end of the data",
    "is missing or empty",
    "has characters other than digits and dots, or an empty component",
    "dataset SOPInstanceUID differs from the request's",
    "internal error in dicomnode",
    ": unexpected error",
    # completion and jobs
    "series complete series_uid=",
    "not a volume (",
    "waiting for ",
    "content check: slices are not axial (",
    "mL required",
    "superseded: a late instance re-opened the series; a newer job replaces this",
    # priors and study scope
    "waiting for priors",
    " failed with status 0x",
    "gave up after ",
    "no earlier study of the patient on ",
    "no complete series of the earlier studies on ",
    "no series fits (",
    "(study scope): ",
    "series mixes matrix sizes",
    "series has uneven slice spacing (",
    "failed our checks: ",
    "; the object is kept at ",
    "outputs.validate is dciodvfy but it is not installed",
    "out of device memory even for one slice",
    "does not match weights.sha256",
    "internal error: ",
    " (details in the DEBUG log)",
    "no space left on device in the results folder (",
    " object(s) written, ",
    "; retried when space is freed",
    " MiB are (storage.min_free_mb)",
    "no space left on device while running the job",
    "lease expired job_id=",
    "lease of worker ",
    "job released job_id=",
    # deliveries and storage commitment
    "delivery failed job_id=",
    "cannot connect to ",
    "association aborted by the peer",
    " (a TLS port? set tls_ca)",
    "certificate verify failed: ",
    "does not accept SOP class ",
    "no reply to C-STORE (connection lost)",
    "C-STORE failed with status 0x",
    "(set storage_commitment = false for it)",
    "commitment N-ACTION failed with status 0x",
    "object(s) not committed",
    "commitment timed out after ",
    "commitment report for unknown transaction_uid=",
    "commitment report refused peer=",
    "not a destination asked to commit",
    " within a minute: ",
    "object(s) stored with warning 0x",
    " ok (",
    # start-up
    "configuration error: ",
    "unknown setting (no such section)",
    "set both tls_certificate and tls_private_key, or neither",
    "needs tls_ca (the PACS's CA bundle)",
    "needs prometheus-client; pip install 'dicomnode[metrics]'",
    "configuration file not found",
    "models folder not found",
    "models.path: ",
    "is not an installed segmentation model",
    "the code needs ",
    "run `dicomnode db upgrade`",
    "listener: cannot listen on ",
    "metrics: cannot listen on ",
    "is in use by another listening dicomnode",
    "); one listening node per spool",
    "is in use by another dicomnode on this host",
    "); one node per port",
    "holder not known",
    "descriptor limit ",
    " that listener.max_associations=",
    # the disk
    "below storage.min_free_mb",
    "the listener refuses instances",
    "files no row names, left by an interrupted store",
    "retention deleted series_uid=",
    "the spool's disk is still below retention.emergency_free_mb",
]


@cache
def _doc_text() -> str:
    """The doc with its line breaks as spaces: quoted messages wrap across lines."""
    return " ".join(DOC.read_text(encoding="utf-8").split())


@cache
def _source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py")))


def test_enough_fragments_are_checked() -> None:
    assert len(FRAGMENTS) >= 15
    assert len(set(FRAGMENTS)) == len(FRAGMENTS)


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_the_doc_quotes_it(fragment: str) -> None:
    assert fragment in _doc_text(), (
        f"{fragment!r} is no longer in docs/troubleshooting.md: drop it from this list"
    )


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_the_code_still_says_it(fragment: str) -> None:
    assert fragment in _source_text(), (
        f"docs/troubleshooting.md quotes {fragment!r}, which no file under dicomnode/ "
        "contains any more: update the doc with the new message"
    )
