"""The store's errors: each names the file, the field or the keys that were wrong."""


class StoreError(Exception):
    """Base class of every error gradstore raises on purpose."""


class FormatError(StoreError):
    """The file is not a store, or one this version cannot read, or its bytes are damaged."""


class CorruptChunkError(FormatError):
    """A stored chunk does not decode; ``keys`` holds the rows it covers."""

    def __init__(self, message, keys):
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
