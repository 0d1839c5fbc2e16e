"""Exceptions for user-facing mistakes.

Every error a user can cause (a bad name, a broken file, a missing dataset folder) is a
``PspZooError``: its message says what was wrong and what to do, and the CLI prints it on one
line and exits non-zero instead of showing a traceback.
"""
from __future__ import annotations

from typing import Optional


class PspZooError(Exception):
    """Base class of every error psp-zoo raises for bad input or an unusable environment.

    The message says what to do in library terms (an argument, an environment variable, a path);
    ``cli_hint`` optionally names the command-line way to do it, which the CLI appends.
    """

    def __init__(self, message: str = "", *, cli_hint: Optional[str] = None):
        super().__init__(message)
        self.cli_hint = cli_hint


class ManifestError(PspZooError, ValueError):
    """A manifest file is malformed: names the entry and the field."""


class UnknownModelError(PspZooError, KeyError):
    """A checkpoint name is not in the manifest: lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written
        return str(self.args[0]) if self.args else ""


class CheckpointError(PspZooError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


class DownloadError(PspZooError):
    """A checkpoint could not be fetched or verified.

    ``summary`` is why it failed in a few words and ``advice`` what to do, when the message says
    both; a command fetching many files says each file's summary and the advice once.
    """

    def __init__(self, message: str = "", *, cli_hint: Optional[str] = None, summary: Optional[str] = None,
                 advice: Optional[str] = None):
        super().__init__(message, cli_hint=cli_hint)
        self.summary, self.advice = summary or message, advice


class DatasetError(PspZooError):
    """A dataset folder is missing, incomplete or unreadable."""


class ResultsError(PspZooError):
    """A results file is malformed or a results folder is missing: names the file and the field."""


class ModelConfigError(PspZooError, ValueError):
    """A network configuration no published PSPNet has (depth, output stride, backbone name)."""


def one_line(exc: BaseException) -> str:
    """An error as one line for people: a PspZooError's message with its command-line hint, any
    other exception with its type (it is not a user mistake, so its kind matters)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, PspZooError):
        return f"{type(exc).__name__}: {text}"
    return f"{text} ({exc.cli_hint})" if exc.cli_hint else text
