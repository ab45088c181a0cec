"""The one registry of layer handlers: which module types the masked engine records, and how.

``register_handler(nn.Linear)`` on a ``Handler`` subclass makes the engine record every
``nn.Linear`` and every subclass of it that has no nearer registered base (the nearest
registered class along the module type's MRO wins). Users register handlers for their own
module types the same way, from outside the package. The engine resolves each module's
handler once, when it hooks the model: a handler registered later serves engines built later.

A type of an optional dependency is registered by its qualified name, without importing it:
``register_handler("transformers.pytorch_utils.Conv1D")`` serves every module whose class, or a
class along its MRO, has ``f"{cls.__module__}.{cls.__qualname__}"`` equal to that name.
``registered_handlers()`` lists it by its class when the class can be imported (it imports it then).
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, TypeVar, Union

from torch import nn

from ...errors import UnlearnError
from .base import Handler

H = TypeVar("H", bound=type[Handler])

TypeOrName = Union[type[nn.Module], str]

# module type, or a type's qualified name "package.module.Class" (not imported) -> its handler, in registration order
_HANDLERS: dict[TypeOrName, Handler] = {}


def qualified_name(cls: type) -> str:
    """``f"{cls.__module__}.{cls.__qualname__}"``: what a type registered by name is matched against."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _key(module_type: TypeOrName) -> TypeOrName:
    """The registry's key for a type or name: a type registered by its qualified name is found under it."""
    if isinstance(module_type, type) and module_type not in _HANDLERS and qualified_name(module_type) in _HANDLERS:
        return qualified_name(module_type)
    if isinstance(module_type, str):
        for known in _HANDLERS:
            if isinstance(known, type) and qualified_name(known) == module_type:
                return known
    return module_type


def _label(module_type: TypeOrName) -> str:
    if isinstance(module_type, str):  # "Conv1D (transformers)": not to be read as nn.Conv1d
        return f"{module_type.rpartition('.')[2]} ({module_type.partition('.')[0]})"
    return module_type.__name__


def _resolve(name: str) -> Optional[type]:
    """The class a qualified name names, importing its module; None where it cannot be imported."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # not installed, or failing to import: nothing of it can be a module's class here
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
        if isinstance(found, type) and issubclass(found, nn.Module) and qualified_name(found) == name:
            return found
        return None
    return None


def register_handler(*module_types: TypeOrName) -> Callable[[H], H]:
    """Class decorator: the masked engine records modules of these types (and their subclasses)
    with one instance of the decorated ``Handler`` subclass. A type may be given by its qualified
    name (``"transformers.pytorch_utils.Conv1D"``): an optional dependency is then not imported.

    A type already registered is refused (``unregister_handler`` it first): two handlers
    for one type would leave which one computes the rows to import order.
    """
    for module_type in module_types:
        if isinstance(module_type, str):
            if "." not in module_type or not all(part.isidentifier() for part in module_type.split(".")):
                raise UnlearnError(f"register_handler takes a qualified name 'package.module.Class', got {module_type!r}")
        elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise UnlearnError(f"register_handler takes nn.Module subclasses, got {module_type!r}")
    if not module_types:
        raise UnlearnError("register_handler needs at least one module type: @register_handler(MyModule)")

    def decorate(handler_class: H) -> H:
        if not (isinstance(handler_class, type) and issubclass(handler_class, Handler)):
            raise UnlearnError(f"@register_handler decorates a subclass of unlearn.recording.Handler, "
                               f"got {handler_class!r}")
        taken = [f"{_label(t)} (by {type(_HANDLERS[_key(t)]).__name__})" for t in module_types if _key(t) in _HANDLERS]
        if taken:
            raise UnlearnError(f"already registered: {', '.join(taken)}. Fix: unregister_handler(...) first")
        handler = handler_class()
        for module_type in module_types:
            _HANDLERS[module_type] = handler
        return handler_class

    return decorate


def unregister_handler(*module_types: TypeOrName) -> None:
    """Forget the handlers of these module types, or qualified names (tests, or to replace a built-in handler)."""
    missing = [_label(t) for t in module_types if _key(t) not in _HANDLERS]
    if missing:
        raise UnlearnError(f"no handler is registered for {', '.join(missing)}")
    for module_type in module_types:
        del _HANDLERS[_key(module_type)]


def registered_handlers() -> dict[type[nn.Module], Handler]:
    """{module type: handler} as registered (a copy: registering goes through ``register_handler``).
    A type registered by its qualified name is listed by its class, imported here, where it can be
    imported (transformers' Conv1D when transformers is installed), and left out where it cannot."""
    found: dict[type[nn.Module], Handler] = {}
    for key, handler in _HANDLERS.items():
        cls = _resolve(key) if isinstance(key, str) else key
        if cls is not None:
            found[cls] = handler
    return found


def handler_for(module: nn.Module) -> Optional[Handler]:
    """The handler of the module's type, or of its nearest registered base class (most specific
    first along the MRO: ``nn.MultiheadAttention.out_proj`` is a ``NonDynamicallyQuantizableLinear``,
    recorded as a Linear), or None. A subclass that changes the forward is caught by the engine's
    one-time check (``engine.verify_separation``), which compares the handler's gradient with autograd's.
    The engine calls this once per module, when it hooks the model, never per step."""
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls) or _HANDLERS.get(qualified_name(cls))
        if handler is not None:
            return handler
    return None


def supported() -> str:
    """The registered module types, for messages: "Linear, Conv1d, ... and their subclasses"."""
    return ", ".join(_label(key) for key in _HANDLERS) + " and their subclasses"
