"""Exceptions raised by gradprobe.

Every error a user can cause by what they pass in (options, files, models) is a
:class:`GradprobeError`. The command line turns these into one line on stderr and
exit code 2; anything else is a bug.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GradprobeError",
    "InputError",
    "DataError",
    "ModelError",
    "BudgetError",
    "RunInterrupted",
]


class GradprobeError(Exception):
    """Base class of the errors gradprobe raises for bad input."""


class InputError(GradprobeError, ValueError):
    """An option or argument is malformed (wrong type, out of range)."""


class DataError(GradprobeError):
    """A data file or record is missing, empty or undecodable."""


class ModelError(GradprobeError):
    """A model path or architecture cannot be used."""


class BudgetError(GradprobeError, ValueError):
    """A frame budget the model or the data cannot take."""


class RunInterrupted(KeyboardInterrupt):
    """A long run stopped by Ctrl-C; ``.report`` holds everything computed so far (already saved)."""

    what = "run"

    def __init__(self, report: Any) -> None:
        super().__init__(f"{self.what} interrupted")
        self.report = report
