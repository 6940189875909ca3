"""Who made an output and how it is identified: UIDs, descriptions, disclaimers."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

import dicomnode

MANUFACTURER = "dicomnode"
RESEARCH_NOTICE = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class Provenance:
    """The algorithm and software behind an output.

    Attributes
    ----------
    model_name, model_version : str
        The model package.
    clinical_use : bool
        False marks every object "not for clinical use".
    uid_root : str
        Prefix for the UIDs we create; pydicom's when empty.
    """

    model_name: str
    model_version: str
    clinical_use: bool = False
    uid_root: str = ""

    @property
    def software_versions(self) -> list[str]:
        """Return [dicomnode version, model name and version] (a list: pydicom refuses tuples)."""
        return [f"dicomnode {dicomnode.__version__}", f"{self.model_name} {self.model_version}"]

    def series_description(self, kind: str) -> str:
        """Return a Series Description (LO, at most 64 characters).

        Parameters
        ----------
        kind : str
            What the series holds, e.g. "SEG" or "SR".

        Returns
        -------
        str
            For example ``"AI lung-unet2d SEG - RESEARCH, NOT FOR CLINICAL USE"``.
        """
        text = f"AI {self.model_name} {kind}"
        if not self.clinical_use:
            text += " - RESEARCH, NOT FOR CLINICAL USE"
        return text[:64]

    def uid(self, *parts: str) -> str:
        """Return a UID derived from ``parts``: the same parts always give the same UID.

        Deterministic UIDs make a re-sent result the same object to the PACS rather than
        a duplicate, and let a re-run address the series it replaces.

        Parameters
        ----------
        *parts : str
            What identifies the object (source series, model, version, kind, ...).

        Returns
        -------
        str
            A UID under :attr:`uid_root`.
        """
        return str(generate_uid(prefix=self.uid_root or PYDICOM_ROOT_UID, entropy_srcs=list(parts)))
