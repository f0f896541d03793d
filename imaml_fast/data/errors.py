"""The errors of the data layer.

Every problem with data on disk (a missing folder, a corrupt zip, a wrong layout, a checksum
that does not match, a failed download) raises DataError, a ValueError, with one message that
says what is wrong, where, and how to fix it. Code that already catches ValueError for bad
input keeps working; code that wants only data problems catches DataError.
"""
from __future__ import annotations


class DataError(ValueError):
    """Data on disk is missing, corrupt or laid out differently than expected."""


class ChecksumError(DataError):
    """A file's sha256 is not the published one: the file is corrupt, truncated or different."""
