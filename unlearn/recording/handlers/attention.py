"""nn.MultiheadAttention, in place: each sample's gradient from the module's own functional forward.

The module returns ``(output, weights)`` and reads ``out_proj.weight`` without calling ``out_proj``: the
handler declares ``tuple_output`` (the engine hooks its call with the keyword arguments, the masks among
them, and the output's first tensor, batch first) and claims ``out_proj``'s parameters. Its ``inputs`` hands
the Capture every tensor batch-first, whatever ``batch_first`` says: (query, key, value, key_padding_mask
[B, S], attn_mask as [B, H, T, S] (a view of the user's [T, S], or the user's [B * H, T, S] reshaped),
need_weights, is_causal, which of query/key/value are one tensor).

``dense`` forms every trainable parameter's per-sample gradient once per call (cached for the call): packed
``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim or
vdim differ from embed_dim, ``bias_k``/``bias_v``, and the claimed ``out_proj.weight``/``out_proj.bias``.
Without bias_k/bias_v (``_batched``): the projections are linear, so ``F.multi_head_attention_forward``
(what the module's forward runs, masks and is_causal as given) runs on the projected q, k, v with identity
projections, one batched vjp gives each sample's gradient at q, k, v (the attention keeps the samples
apart), and each projection's per-sample gradient is a Linear's. With bias_k/bias_v (they join every
sample's keys): ``torch.func.vjp`` of ``F.multi_head_attention_forward`` with the parameters as inputs,
one sample at a time.

Cost: batched, one more attention forward and backward per call and [B, numel] floats per parameter
(docs/RECORDING.md gives a measure); with bias_k/bias_v, a small vjp per sample.

Refused: dropout inside the attention while training (its mask is drawn in the forward; a recomputation
cannot draw the same one), an unbatched (2-d) query.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModelError
from .base import Capture, Handler
from .registry import register_handler

# The module's own parameters the recomputation takes, by name (absent ones are None on the module).
OWN = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")
# nn.MultiheadAttention.forward's positional parameters, in order.
SIGNATURE = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")

DROPOUT_HELP = ("its dropout (dropout={p}) draws a mask inside the forward, which the handler's recomputation "
                "cannot draw again. Fix: set module.dropout = 0.0 on the attention (nn.TransformerEncoderLayer("
                "dropout=...) sets it too: the layer's other dropouts are fine), or record in eval mode")


class _SelfAttention(nn.MultiheadAttention):
    """The contract test's example: a MultiheadAttention called as module(x), self-attention returning a tensor."""

    def forward(self, x, *args, **kwargs):  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False)[0]


@register_handler(nn.MultiheadAttention)
class MultiheadAttentionHandler(Handler):
    """Self- and cross-attention, batch_first True or False, key_padding_mask, attn_mask, is_causal."""

    claims = ("out_proj.weight", "out_proj.bias")
    tuple_output = True

    def __init__(self) -> None:
        self._grads: weakref.WeakKeyDictionary[Capture, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        module = _SelfAttention(6, 2, add_bias_kv=True, batch_first=True)
        return module, torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))

    def refusal(self, module: nn.Module) -> Optional[str]:
        dropout = float(getattr(module, "dropout", 0.0))
        if module.training and dropout > 0:
            return DROPOUT_HELP.format(p=dropout)
        return None

    def batch_dim(self, module: nn.Module) -> int:
        return 0 if getattr(module, "batch_first", False) else 1

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        bound = dict(zip(SIGNATURE, args))
        bound.update(kwargs)
        query = bound.get("query")
        key = bound.get("key", query)  # a subclass called as module(x): self-attention (the engine's check verifies)
        value = bound.get("value", key)
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
            shapes = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (query, key, value)]
            raise UnsupportedModelError(
                f"{type(module).__name__} called with query, key, value {shapes}: the masked engine records batched "
                "(3-d) attention only. Fix: call it on a batch, [B, T, E] (batch_first=True) or [T, B, E]")
        assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
        same = "qkv" if query is key and key is value else "kv" if key is value else ""
        if self.batch_dim(module):
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        heads = int(getattr(module, "num_heads", 1))
        attn_mask = bound.get("attn_mask")
        if isinstance(attn_mask, torch.Tensor):  # batch first, so that slicing a sample slices its mask
            if attn_mask.dim() == 2:
                attn_mask = attn_mask[None, None].expand(batch, heads, length, source)
            else:
                attn_mask = attn_mask.reshape(batch, heads, length, source)
        return (query, key, value, bound.get("key_padding_mask"), attn_mask, bool(bound.get("need_weights", True)),
                bool(bound.get("is_causal", False)), same)

    def formed_whole(self, name: str) -> bool:
        return True

    def dense_is_cheap(self, name: str) -> bool:
        return False  # a vjp per sample: never the engine's probe

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        grads = self._grads.get(capture)
        if grads is None:
            grads = self._grads[capture] = self._per_sample(capture)
        if name not in grads:
            raise NotImplementedError(f"{type(self).__name__} forms no gradient for {name!r} (frozen or absent)")
        return grads[name]

    def _per_sample(self, capture: Capture) -> dict[str, torch.Tensor]:
        module = capture.module
        assert isinstance(module, nn.MultiheadAttention)
        refusal = self.refusal(module)
        if refusal is not None:
            raise UnsupportedModelError(f"{type(module).__name__}: {refusal}")
        query, key, value, key_padding_mask, attn_mask, need_weights, is_causal, same = capture.inputs
        everything: dict[str, Optional[torch.Tensor]] = {name: getattr(module, name) for name in OWN}
        everything["out_proj.weight"] = module.out_proj.weight
        everything["out_proj.bias"] = module.out_proj.bias
        free = {n: p.detach().float() for n, p in everything.items() if isinstance(p, nn.Parameter) and p.requires_grad}
        fixed = {n: None if p is None else p.detach().float() for n, p in everything.items() if n not in free}

        def as_float(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return mask.detach().float() if mask is not None and mask.is_floating_point() else mask

        def attend(params: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   padding: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
            p: dict[str, Optional[torch.Tensor]] = {**fixed, **params}
            out_weight = p["out_proj.weight"]
            assert out_weight is not None
            out, _ = F.multi_head_attention_forward(
                q, k, v, module.embed_dim, module.num_heads, p["in_proj_weight"], p["in_proj_bias"], p["bias_k"],
                p["bias_v"], module.add_zero_attn, module.dropout, out_weight, p["out_proj.bias"],
                training=module.training, key_padding_mask=padding, need_weights=need_weights, attn_mask=mask,
                use_separate_proj_weight=not module._qkv_same_embed_dim, q_proj_weight=p["q_proj_weight"],
                k_proj_weight=p["k_proj_weight"], v_proj_weight=p["v_proj_weight"], is_causal=is_causal)
            return out

        if module.bias_k is None and module.bias_v is None:  # else one sample at a time: they join each sample's keys
            return self._batched(capture, free, fixed, as_float)
        batch = capture.delta.shape[0]
        rows = {n: torch.empty(batch, p.numel(), device=p.device) for n, p in free.items()}
        for b in range(batch):  # [T, 1, E]: the functional form is sequence-first
            q = query[b:b + 1].detach().float().transpose(0, 1)
            k = q if same == "qkv" else key[b:b + 1].detach().float().transpose(0, 1)
            v = k if same else value[b:b + 1].detach().float().transpose(0, 1)
            padding = None if key_padding_mask is None else as_float(key_padding_mask[b:b + 1])
            mask = None if attn_mask is None else as_float(attn_mask[b])  # [H, T, S]
            with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
                pull = torch.func.vjp(lambda params: attend(params, q, k, v, padding, mask), free)[1]
                (grads,) = pull(capture.delta[b:b + 1].transpose(0, 1).contiguous())
            for n, g in grads.items():
                rows[n][b] = g.reshape(-1)
        return rows

    def _batched(self, capture: Capture, free: dict[str, torch.Tensor], fixed: dict[str, Optional[torch.Tensor]],
                 as_float: Callable[[Optional[torch.Tensor]], Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Without bias_k/bias_v, the whole batch at once: the projections are linear, so the module's own
        F.multi_head_attention_forward runs on the projected q, k, v with identity projections (exact: products
        with 1 and no bias), its batched gradient at q, k, v is each sample's own (the core keeps the samples
        apart), and each projection's per-sample gradient is a Linear's: sum_t delta[b, t] (x) input[b, t]."""
        module = capture.module
        assert isinstance(module, nn.MultiheadAttention)
        query, key, value, key_padding_mask, attn_mask, need_weights, is_causal, _ = capture.inputs
        p = {**fixed, **free}
        width = module.embed_dim
        packed = p["in_proj_weight"]
        weights = packed.chunk(3) if packed is not None else (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
        assert all(w is not None for w in weights)
        bias = p["in_proj_bias"]
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        xs = [t.detach().float() for t in (query, key, value)]
        projected = [F.linear(x, w, b) for x, w, b in zip(xs, weights, biases) if w is not None]  # [B, T or S, E] each
        eye = torch.eye(width, device=xs[0].device)
        padding = as_float(key_padding_mask.detach()) if key_padding_mask is not None else None
        mask = None if attn_mask is None else as_float(attn_mask.detach().reshape(-1, *attn_mask.shape[2:]))
        delta = capture.delta

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out, _ = F.multi_head_attention_forward(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), width, module.num_heads, eye.repeat(3, 1),
                None, None, None, module.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=padding,
                need_weights=need_weights, attn_mask=mask, is_causal=is_causal)
            return out.transpose(0, 1)

        with torch.enable_grad(), torch.autocast(delta.device.type, enabled=False):
            attended, pull = torch.func.vjp(core, *projected)[:2]
            out_weight = p["out_proj.weight"]
            assert out_weight is not None
            at_projected = pull(delta @ out_weight)
        rows: dict[str, torch.Tensor] = {}
        batch = delta.shape[0]
        per_weight = [torch.einsum("bto,bti->boi", d, x) for d, x in zip(at_projected, xs)]
        per_bias = [d.sum(1) for d in at_projected]
        for n in free:
            if n == "out_proj.weight":
                rows[n] = torch.einsum("bto,bti->boi", delta, attended).reshape(batch, -1)
            elif n == "out_proj.bias":
                rows[n] = delta.sum(1)
            elif n == "in_proj_weight":
                rows[n] = torch.cat(per_weight, 1).reshape(batch, -1)
            elif n == "in_proj_bias":
                rows[n] = torch.cat(per_bias, 1)
            else:
                rows[n] = per_weight[("q_proj_weight", "k_proj_weight", "v_proj_weight").index(n)].reshape(batch, -1)
        return rows
