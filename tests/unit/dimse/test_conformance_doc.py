"""The conformance statement lists every SOP class and transfer syntax the code accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.dimse import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES

DOC = (Path(__file__).resolve().parents[3] / "docs" / "conformance.md").read_text()


@pytest.mark.parametrize("uid", ACCEPTED_SOP_CLASSES + ACCEPTED_TRANSFER_SYNTAXES)
def test_every_accepted_uid_is_in_the_statement(uid: str) -> None:
    assert f"`{uid}`" in DOC, f"{uid} is accepted by the code but not in docs/conformance.md"


def test_the_statement_lists_nothing_the_code_does_not_accept() -> None:
    import re

    section = DOC.split("## Storage SCP: accepted SOP classes")[1].split("## Transfer")[0]
    listed = set(re.findall(r"`(1\.2\.840\.[0-9.]+)`", section))
    assert listed == set(ACCEPTED_SOP_CLASSES)
