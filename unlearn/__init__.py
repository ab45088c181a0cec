"""Training that records, forgetting, evaluation: needs the `unlearn` extra (torch)."""

import importlib.util as _util

_MISSING = [name for name in ("torch", "torchvision", "tqdm", "sklearn") if _util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"unlearn needs {', '.join(_MISSING)}, not installed: pip install 'amnesiac-gradstore[unlearn]' "
                      "(the store alone, gradstore, needs none of them)")
del _util, _MISSING
