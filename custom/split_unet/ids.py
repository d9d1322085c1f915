"""The rules for values that enter from outside (datalists, partitions, PSI results, messages): patient ids, and
integers and numbers that are not bools.

A patient id becomes a file name (``<id>.nii.gz`` in a partition or a segmentation folder), a key in every
party's lists and a log entry, so it must be a plain name: 1-128 letters, digits, '.', '_' or '-', starting
with a letter or digit (so never '.', '..' or a hidden file), and a string (a string is not a list of ids).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Integral

from split_unet.errors import DataError, SplitUNetError

PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_patient_id(value: object, *, site: str | None = None, field: str = "patient_id",
                     error: type[SplitUNetError] = DataError) -> str:
    """``value`` if it is a valid patient id, else ``error`` naming the site and the field."""
    if not isinstance(value, str) or PATIENT_ID.fullmatch(value) is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise error(f"patient id {shown} is not 1-128 letters, digits, '.', '_' or '-' starting with a letter or "
                    f"digit", site=site, field=field)
    return value


def check_patient_ids(values: object, *, site: str | None = None, field: str = "patient_ids",
                      error: type[SplitUNetError] = DataError) -> list[str]:
    """A list of distinct valid patient ids (a single string is refused, not read as its characters)."""
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise error(f"expected a list of patient ids, got {type(values).__name__}", site=site, field=field)
    ids = [check_patient_id(value, site=site, field=field, error=error) for value in values]
    if len(set(ids)) != len(ids):
        raise error("patient ids repeat", site=site, field=field)
    return ids


def is_integer(value: object, *, numpy: bool = False) -> bool:
    """An ``int`` that is not a bool (Python's ``True`` is an ``int``, but never a step, count or size); with
    ``numpy``, numpy's integers too (shapes and corners a party computes itself, besides those a message carries)."""
    return isinstance(value, Integral if numpy else int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
