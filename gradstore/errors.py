"""The store's errors: each names the file, the field or the keys that were wrong."""

import os
import re
from typing import Sequence, Union


class StoreError(Exception):
    """Base class of every error gradstore raises on purpose."""


class FormatError(StoreError):
    """The file is not a store, or one this version cannot read, or its bytes are damaged."""


class CorruptChunkError(FormatError):
    """A stored chunk does not decode; ``keys`` holds the rows it covers."""

    def __init__(self, message: str, keys: Sequence[int]):
        super().__init__(message)
        self.keys = keys


class BadInputError(StoreError, ValueError):
    """Arguments the store refuses: wrong shape, dtype, keys, or non-finite values."""


class ReadOnlyError(StoreError):
    """A write to a store opened read-only, or to one whose recording has finished."""


class StoreLockedError(StoreError):
    """Another process has the store open for writing (HDF5's file lock)."""


class WriteFailedError(StoreError, OSError):
    """The operating system refused a write (disk full, quota, file size limit, I/O error)."""


def os_reason(error: Union[str, BaseException]) -> str:
    """The operating system's reason for a failed write, in its own words ('No space left on device').

    h5py's OSError carries the errno of HDF5's failed write(2) but a message of several
    lines ("file write failed: time = ..."); a CLI that prints one line would lose the reason.
    """
    number = getattr(error, "errno", None)
    if not number:
        found = re.search(r"errno = (\d+)", str(error))
        number = int(found.group(1)) if found else None
    if number:
        return os.strerror(number)
    text = " ".join(str(error).split())
    return text or type(error).__name__


def write_failed(path: Union[str, os.PathLike], error: BaseException, outcome: str) -> WriteFailedError:
    """A WriteFailedError whose one line starts with the reason and says what became of the files."""
    failure = WriteFailedError(f"{os_reason(error)}: writing {path} failed; {outcome}")
    failure.errno = getattr(error, "errno", None)
    return failure
