"""Errors raised when a dataset cannot be found or read."""
from __future__ import annotations

from typing import Sequence

__all__ = ["DatasetNotFoundError", "DatasetCorruptError", "ImageReadError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing (or unreadable). The message lists every place that was searched
    and every way to provide the data; ``looked`` and ``hints`` hold the same lists."""

    def __init__(self, name: str, looked: Sequence[str], hints: Sequence[str],
                 reason: str | None = None) -> None:
        self.name = name
        self.looked = [str(p) for p in looked]
        self.hints = list(hints)
        self.reason = reason
        lines = [reason or f"dataset {name!r} was not found."]
        if self.looked:
            lines.append("Looked in:")
            lines += [f"  - {p}" for p in self.looked]
        if self.hints:
            lines.append("To provide it:")
            lines += [f"  - {h}" for h in self.hints]
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # OSError's __str__ would add errno decorations
        return self.args[0]


class DatasetCorruptError(DatasetNotFoundError):
    """A dataset's files exist but cannot be read (truncated, wrong format, wrong sizes)."""


class ImageReadError(OSError):
    """An image file of a dataset read from disk cannot be decoded (missing, truncated, not an
    image). One message argument, so a DataLoader worker can re-raise it in the main process."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
