"""Errors that tell the user which file, which field (dataset, line, key) and what is wrong.

Every reader and config loader in peaknet raises :class:`InputError` (or a subclass) for bad
input, so batch jobs can record the failing event with a precise reason and go on.
"""
from __future__ import annotations

import os
from typing import Optional


class InputError(ValueError):
    """Bad input: names the file, the field inside it, and the problem.

    Parameters
    ----------
    path:
        The file (or directory) the problem is in; ``None`` for in-memory input.
    field:
        Where inside it: an HDF5 dataset path, ``"line 42"``, a config key like ``"simulate.frames"``.
    problem:
        What is wrong, in words a user can act on.
    """

    def __init__(self, path: Optional[os.PathLike | str], field: Optional[str], problem: str):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.problem = problem
        where = self.path or "<memory>"
        if field:
            where = f"{where} [{field}]"
        super().__init__(f"{where}: {problem}")


class GeometryError(InputError):
    """A malformed or inconsistent CrystFEL geometry."""


class StreamError(InputError):
    """A malformed CrystFEL stream."""


class ConfigError(InputError):
    """A bad config file, key or value."""


class DataError(InputError):
    """Bad detector data: unreadable, wrong shape/dtype, non-finite pixels."""
