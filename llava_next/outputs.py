"""Where the package writes what a user asked for (a directory of results, a file of predictions): checked when the
work starts, so that a path that cannot be written is one line before a model loads, not a traceback after a run."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LlavaError


class OutputError(LlavaError, OSError):
    """An output path that cannot be written."""


def output_directory(path: str | os.PathLike) -> Path:
    """`path` as a directory to write into, made (with its parents) if it is not there yet."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file; give a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the directory {path}: {e.strerror or e}") from None
    return directory


def output_file(path: str | os.PathLike) -> Path:
    """`path` as a file to write, its directory made if it is not there yet."""
    file = Path(path)
    if file.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file name")
    output_directory(file.parent)
    return file
