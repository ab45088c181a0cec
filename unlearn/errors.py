"""The errors ``unlearn`` raises on bad input: every one a ``ValueError``, typed by what was wrong.

Catch ``UnlearnError`` for all of them, or the one kind a caller can act on. Errors of the
store itself stay ``gradstore``'s (``gradstore.StoreError`` and its kinds).
"""


class UnlearnError(ValueError):
    """Bad input to unlearn: the message names what was wrong and, where there is one, the fix."""


class UnsupportedModelError(UnlearnError):
    """A model, module or parameter the engine cannot attribute to samples; names its path and the fix."""


class RecordingUsageError(UnlearnError):
    """The recording optimizer, loader or recorder used out of order or with inputs it cannot key."""


class RunConfigError(UnlearnError):
    """A run's settings (train.json, CLI options, dataset or model names) that do not fit together."""


class RunFolderError(UnlearnError):
    """A run folder, or a file in it, that is missing, unreadable or not what the run wrote."""


class RequestError(UnlearnError):
    """A forget request that cannot be served: keys out of range, already forgotten, or an unknown rule."""


class DatasetError(UnlearnError):
    """Dataset files that are missing or not in the format expected."""
