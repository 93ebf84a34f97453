"""``nn.MultiheadAttention`` whose heads can be removed.

``nn.MultiheadAttention`` derives its head size from the embedding size
(``embed_dim // num_heads``) and merges the batch and head axes before
attention, so a channel graph traced through it cannot tell heads apart and
a module with fewer heads cannot be expressed with it. ``HeadPrunableAttention``
computes the same thing with the heads on an axis of their own (batch, heads,
positions, head size) and a head size that stays fixed when heads go, so the
torch frontend sees one ``Attention`` op per layer and a plan can remove whole
heads. It is a subclass with the same parameters, state-dict keys and call
signature; ``swapped_attention`` puts it in place for tracing, and the torch
backend keeps it in the pruned module.

Layers with ``bias_k``/``bias_v`` or ``add_zero_attn`` are not swapped: their
heads stay frozen.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HeadPrunableAttention", "is_swappable", "swap_attention", "swapped_attention"]


class HeadPrunableAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with an explicit head axis and a fixed query/key head size.

    Queries and keys have ``num_heads * head_dim`` rows, values
    ``num_heads * v_head_dim`` (smaller than ``head_dim`` when value channels
    were pruned in every head); both may be smaller than ``embed_dim`` after
    pruning. Fused fast paths (``TransformerEncoderLayer``'s native kernel) are
    turned off by ``_qkv_same_embed_dim = False``; the parameters keep their
    names (``in_proj_weight`` when they were packed).
    """

    _packed: bool
    v_head_dim: int

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> HeadPrunableAttention:
        """A view of ``mha`` with the same parameter tensors (nothing is copied)."""
        if not is_swappable(mha):
            raise ValueError("bias_k/bias_v and add_zero_attn are not supported")
        new = cls.__new__(cls)
        new.__dict__.update(mha.__dict__)
        for slot in ("_parameters", "_buffers", "_modules"):
            new.__dict__[slot] = dict(mha.__dict__[slot])
        new._packed = bool(mha._qkv_same_embed_dim)
        new.v_head_dim = mha.head_dim
        new._qkv_same_embed_dim = False
        return new

    def _projections(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        rows = [self.num_heads * self.head_dim] * 2 + [self.num_heads * self.v_head_dim]
        weights = self.in_proj_weight.split(rows) if self._packed else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(rows) if self.in_proj_bias is not None else (None, None, None)
        return weights, biases

    def _heads(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: int) -> torch.Tensor:
        """(N, L, E) -> projected (N, heads, L, ``size``); the head count is -1, so the trace sees it follow the kept heads."""
        y = F.linear(x, weight, bias)
        return y.reshape(y.shape[0], y.shape[1], -1, size).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, length: int,
              source: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive float mask broadcastable to (N, heads, L, S), as ``nn.MultiheadAttention`` merges them."""
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            mask = m.reshape(1, 1, length, source) if m.dim() == 2 else m.reshape(n, -1, length, source)
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, dtype).reshape(n, 1, 1, source)
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence, sequence-first
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not batched or not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        (wq, wk, wv), (bq, bk, bv) = self._projections()
        q, k, v = self._heads(query, wq, bq, self.head_dim), self._heads(key, wk, bk, self.head_dim), self._heads(value, wv, bv, self.v_head_dim)
        mask = self._mask(attn_mask, key_padding_mask, q.shape[0], q.shape[2], k.shape[2], q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights and p > 0.0:
            weights = F.dropout(_scores(q, k, mask).softmax(dim=-1), p)  # returned after dropout, as torch does
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            if need_weights:
                weights = _scores(q, k, mask).softmax(dim=-1)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not batched or not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is None:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as 0 / -inf; a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores if mask is None else scores + mask


def is_swappable(m: nn.Module) -> TypeGuard[nn.MultiheadAttention]:
    """An ``nn.MultiheadAttention`` that ``HeadPrunableAttention`` can stand in for."""
    return (isinstance(m, nn.MultiheadAttention) and not isinstance(m, HeadPrunableAttention)
            and m.bias_k is None and m.bias_v is None and not m.add_zero_attn)


def swap_attention(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put a ``HeadPrunableAttention`` in place of every swappable layer of ``root``, in place.

    Returns:
        (parent, attribute, original) per swapped layer, to undo the swap.
    """
    done: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if is_swappable(child):
                setattr(parent, name, HeadPrunableAttention.from_module(child))
                done.append((parent, name, child))
    return done


@contextlib.contextmanager
def swapped_attention(root: nn.Module) -> Iterator[nn.Module]:
    """``root`` with its attention layers swapped for the duration of the block (then restored)."""
    done = swap_attention(root)
    try:
        yield root
    finally:
        for parent, name, original in reversed(done):
            setattr(parent, name, original)
