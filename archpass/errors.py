"""Errors archpass reports to its users.

Every error a user can cause is an :class:`ArchpassError`: one line that names the
problem and the fix.  The CLI prints it and exits with :attr:`ArchpassError.exit_code`
(2 for bad input or usage).  :class:`CheckFailed` is a requested check that did not
pass (exit 1).  Anything else is a bug and shows a traceback.
"""

from __future__ import annotations


class ArchpassError(Exception):
    """Bad input or usage: one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f"; {self.fix.rstrip('.')}"
        return text + "."


class ModelLoadError(ArchpassError):
    """The model file cannot be read, checked or shape-inferred."""


class RecipeError(ArchpassError):
    """A recipe is malformed, names unknown passes or sites, or asks for a choice a site does not allow."""


class TargetError(ArchpassError):
    """A target is unknown, broken, or its measurement source is unusable."""


class AnalysisError(ArchpassError):
    """Structural analysis met a graph no rule expected (a bug to report, never a traceback)."""


class OutputError(ArchpassError):
    """An output path cannot receive a file: a directory, a device, an unwritable folder, a read-only filesystem."""


class CalibrationError(ArchpassError):
    """Calibration data cannot be read or does not fit the model's inputs."""


class CheckFailed(ArchpassError):
    """A check the user asked for did not pass: exit code 1."""

    exit_code = 1
