"""The one registry of layer handlers: which module types the masked engine records, and how.

``register_handler(nn.Linear)`` on a ``Handler`` subclass makes the engine record every
``nn.Linear`` and every subclass of it that has no nearer registered base (the nearest
registered class along the module type's MRO wins). Users register handlers for their own
module types the same way, from outside the package. The engine resolves each module's
handler once, when it hooks the model: a handler registered later serves engines built later.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from torch import nn

from ...errors import UnlearnError
from .base import Handler

H = TypeVar("H", bound=type[Handler])

_HANDLERS: dict[type[nn.Module], Handler] = {}  # module type -> its handler, in registration order


def register_handler(*module_types: type[nn.Module]) -> Callable[[H], H]:
    """Class decorator: the masked engine records modules of these types (and their subclasses)
    with one instance of the decorated ``Handler`` subclass.

    A type already registered is refused (``unregister_handler`` it first): two handlers
    for one type would leave which one computes the rows to import order.
    """
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise UnlearnError(f"register_handler takes nn.Module subclasses, got {module_type!r}")
    if not module_types:
        raise UnlearnError("register_handler needs at least one module type: @register_handler(MyModule)")

    def decorate(handler_class: H) -> H:
        if not (isinstance(handler_class, type) and issubclass(handler_class, Handler)):
            raise UnlearnError(f"@register_handler decorates a subclass of unlearn.recording.Handler, "
                               f"got {handler_class!r}")
        taken = [f"{t.__name__} (by {type(_HANDLERS[t]).__name__})" for t in module_types if t in _HANDLERS]
        if taken:
            raise UnlearnError(f"already registered: {', '.join(taken)}. Fix: unregister_handler(...) first")
        handler = handler_class()
        for module_type in module_types:
            _HANDLERS[module_type] = handler
        return handler_class

    return decorate


def unregister_handler(*module_types: type[nn.Module]) -> None:
    """Forget the handlers of these module types (tests, or to replace a built-in handler)."""
    missing = [t.__name__ for t in module_types if t not in _HANDLERS]
    if missing:
        raise UnlearnError(f"no handler is registered for {', '.join(missing)}")
    for module_type in module_types:
        del _HANDLERS[module_type]


def registered_handlers() -> dict[type[nn.Module], Handler]:
    """{module type: handler} as registered (a copy: registering goes through ``register_handler``)."""
    return dict(_HANDLERS)


def handler_for(module: nn.Module) -> Optional[Handler]:
    """The handler of the module's type, or of its nearest registered base class (most specific
    first along the MRO: ``nn.MultiheadAttention.out_proj`` is a ``NonDynamicallyQuantizableLinear``,
    recorded as a Linear), or None. A subclass that changes the forward is caught by the engine's
    one-time check (``engine.verify_separation``), which compares the handler's gradient with autograd's.
    The engine calls this once per module, when it hooks the model, never per step."""
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def supported() -> str:
    """The registered module types, for messages: "Linear, Conv1d, ... and their subclasses"."""
    return ", ".join(cls.__name__ for cls in _HANDLERS) + " and their subclasses"
