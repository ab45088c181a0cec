"""One kernel body compiled twice: parallel for large calls, serial for small ones.

Numba's on-disk cache (``cache=True``) names its entries after the function's qualified
name and first line, not after the ``parallel`` flag: two dispatchers of one Python
function share one cache entry, and whichever compiled first serves both (a cold cache
filled by a small call made the "parallel" scatter-add serial). Each variant here is a
copy of the body with its own name, hence its own cache entry.
"""

import types
from typing import Any, Callable

from numba import njit


def _renamed(body, suffix):
    copy = types.FunctionType(body.__code__, body.__globals__, body.__name__ + suffix, body.__defaults__,
                              body.__closure__)
    copy.__qualname__ = body.__qualname__ + suffix
    copy.__module__ = body.__module__
    copy.__doc__ = body.__doc__
    return copy


def parallel_and_serial(body: Callable, **options: Any) -> tuple[Any, Any]:
    """(parallel, serial) compiled dispatchers of ``body`` (options: njit's, e.g. cache, nogil)."""
    return njit(parallel=True, **options)(_renamed(body, "_parallel")), njit(**options)(_renamed(body, "_serial"))
