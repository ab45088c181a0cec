"""The ``created_at`` a new file records: now, or SOURCE_DATE_EPOCH's time for reproducible files.

With ``SOURCE_DATE_EPOCH`` set (seconds since 1970, the reproducible-builds convention),
two identical runs write byte-identical stores: created_at is the one field that
otherwise differs, and with it the config's CRC in the seal.
"""

import datetime
import os

from .errors import BadInputError


def created_at() -> str:
    """UTC, to the second, ISO 8601: SOURCE_DATE_EPOCH's time when it is set, else now."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH")
    if fixed is None or fixed == "":
        moment = datetime.datetime.now(datetime.timezone.utc)
    else:
        try:
            moment = datetime.datetime.fromtimestamp(int(fixed), datetime.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise BadInputError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {fixed!r}") from None
    return moment.isoformat(timespec="seconds")
