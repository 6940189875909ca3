"""A PACS stand-in for tests: a pynetdicom Storage SCP that counts what it receives.

It accepts SEG and the structured report classes dicomnode sends, plus Verification,
answers every C-STORE with Success and records each one, duplicates included, so a
test can tell "stored once" from "stored twice". It can be stopped and started again
on the same port, for a destination that goes down and comes back.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from tests.conftest import free_port

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SR_CLASSES = frozenset({COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR})
ACCEPTED = (SEG, COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR)


@dataclass(frozen=True)
class Received:
    """One C-STORE request as it arrived."""

    sop_class_uid: str
    series_uid: str
    sop_instance_uid: str
    source_series: str | None  # the image series the object was derived from

    @property
    def is_seg(self) -> bool:
        return self.sop_class_uid == SEG

    @property
    def is_sr(self) -> bool:
        return self.sop_class_uid in SR_CLASSES


def source_series(ds: Dataset) -> str | None:
    """Return the image series a SEG or SR refers to, if it names one."""
    if "ReferencedSeriesSequence" in ds:  # SEG: the segmented series
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    # SR: the evidence lists the SEG's series and the images'; the latter is the source.
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            classes = {str(i.ReferencedSOPClassUID) for i in series.ReferencedSOPSequence}
            if SEG not in classes:
                return str(series.SeriesInstanceUID)
    return None


class CountingSCP:
    """A Storage SCP on 127.0.0.1 that records every C-STORE it answers.

    Parameters
    ----------
    ae_title : str
        The AE title it answers to (it does not check the called AE title).
    port : int, optional
        The port; a free one if omitted. It stays the same across stop() and start().
    """

    def __init__(self, ae_title: str = "COUNTER", port: int | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        item = Received(
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            source_series=source_series(ds),
        )
        with self._lock:
            self._received.append(item)
        return 0x0000

    def start(self) -> CountingSCP:
        """Listen (again) on :attr:`port`, in a background thread."""
        if self._server is not None:
            return self
        ae = AE(ae_title=self.ae_title)
        for sop_class in ACCEPTED:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # pynetdicom sets SO_REUSEADDR, so a restart can bind the port again even while
        # connections of the previous run linger in TIME_WAIT.
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        """Stop listening and close the port: connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def received(self) -> list[Received]:
        """A snapshot of every C-STORE so far, in arrival order, duplicates included."""
        with self._lock:
            return list(self._received)

    def segs(self) -> list[Received]:
        return [r for r in self.received if r.is_seg]

    def srs(self) -> list[Received]:
        return [r for r in self.received if r.is_sr]

    def duplicates(self) -> dict[str, int]:
        """SOP Instance UIDs received more than once, with how often."""
        counts = Counter(r.sop_instance_uid for r in self.received)
        return {uid: n for uid, n in counts.items() if n > 1}

    def __enter__(self) -> CountingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
