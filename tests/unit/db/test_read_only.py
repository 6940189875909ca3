"""Read-only sessions: on SQLite they never take the write lock."""

from __future__ import annotations

from sqlalchemy import func, select

from dicomnode.db import Study, read_only, transaction


def test_a_reader_in_a_transaction_does_not_hold_up_a_writer(sessions) -> None:
    with read_only(sessions)() as reader:
        assert reader.scalar(select(func.count()).select_from(Study)) == 0
        assert reader.in_transaction()  # open, as a listing or a paused export leaves it
        with transaction(sessions) as writer:  # commits at once; no 30 s busy wait
            writer.add(Study(study_uid="1.2.3"))
    with read_only(sessions)() as reader:
        assert reader.scalar(select(func.count()).select_from(Study)) == 1
