"""Errors that name the site, the patient and the field or file they are about."""

from __future__ import annotations


def location(site: str | None = None, patient: str | None = None, field: str | None = None) -> str:
    """``site 'x', patient 'y', field 'z'``, leaving out what is not known."""
    return ", ".join(f"{key} '{value}'" for key, value in (("site", site), ("patient", patient), ("field", field))
                     if value is not None)


class SplitUNetError(Exception):
    """Base class: an error a user can act on, with the site, patient and field/file it concerns."""

    def __init__(self, message: str, *, site: str | None = None, patient: str | None = None,
                 field: str | None = None):
        self.site = site
        self.patient = patient
        self.field = field
        where = location(site, patient, field)
        super().__init__(f"{where}: {message}" if where else message)
        self.detail = message


class DataError(SplitUNetError):
    """A missing, unreadable or inconsistent input file or datalist entry (``field`` is the file path)."""


class ProtocolError(SplitUNetError):
    """A malformed, unexpected or inconsistent message between the server and a site."""
