"""Data errors: DataError is what the user sees, RowError what row validation raises for one row."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem, phrased so the user knows which file, row and column to fix."""


class RowError(ValueError):
    """A bad row; the caller adds file and row to the message."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
