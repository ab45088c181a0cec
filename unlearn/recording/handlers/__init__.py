"""Layer handlers: per-sample gradient entries of one module type each, from what its backward holds.

One module per layer type (``linear``, ``conv``, ``embedding``, ``norm``), each registered
with ``register_handler`` (``registry``) on the ``Handler`` interface (``base``, which also
holds the tunables: ``base.USE_NUMBA``, ``base.DENSE_SHARE``...). Importing this package
registers the built-in handlers, in this order: Linear, transformers' Conv1D (by its qualified
name: transformers is not imported), Conv1d, Conv2d, Embedding, MultiheadAttention, RMSNorm, LayerNorm, GroupNorm.
"""

from . import linear, conv1d, conv, embedding, attention, rmsnorm, norm  # noqa: F401  (registration, in this order)
from .base import Capture, Handler
from .conv import ConvHandler
from .embedding import EmbeddingHandler
from .linear import LinearHandler
from .norm import GroupNormHandler, LayerNormHandler, NormHandler
from .registry import handler_for, register_handler, registered_handlers, supported, unregister_handler

__all__ = ["Capture", "ConvHandler", "EmbeddingHandler", "GroupNormHandler", "Handler", "LayerNormHandler",
           "LinearHandler", "NormHandler", "handler_for", "register_handler", "registered_handlers", "supported",
           "unregister_handler"]
