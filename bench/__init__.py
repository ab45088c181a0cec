"""The benchmarks (python -m bench): need the `bench` extra (torch and matplotlib)."""

import importlib.util as _util

_MISSING = [name for name in ("torch", "torchvision", "tqdm", "sklearn", "matplotlib") if _util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"bench needs {', '.join(_MISSING)}, not installed: pip install 'amnesiac-gradstore[bench]'")
del _util, _MISSING
