"""What every data error derives from, and the one the DVC pull and the image table share."""

from __future__ import annotations

from conf.errors import ExpectedError


class DataError(ExpectedError, ValueError):
    """The images or their listing cannot be used as given."""


class DataNotFoundError(DataError):
    """A folder, manifest, .dvc file or listed image does not exist."""
