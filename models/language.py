"""Token-input transformer reference models: GPT-2-, BERT- and Llama-style (our own code, no Hugging Face).

Each follows the layout of the model it is named after, in miniature, so
its exports hold the same patterns: run-time head-splitting reshapes
(``x.view(*x.size()[:-1], heads, d)``), fused QKV with a split (GPT-2), a
causal mask sliced from a buffer (GPT-2), post-LN residuals with an
attention mask from padding (BERT), RMSNorm, SwiGLU, grouped-query
attention and rotary embeddings (Llama). They take ``(N, L)`` int64 token
ids; ``L`` is dynamic up to ``ctx`` (64; the Llama-style model has no limit).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT2LM", "BertEncoder", "TinyLlama"]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, H*d) -> (N, H, L, d), with the target computed from the run-time shape."""
    return x.view(*x.size()[:-1], heads, x.size(-1) // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, H, L, d) -> (N, L, H*d)."""
    x = x.transpose(1, 2).contiguous()
    return x.view(*x.size()[:-2], x.size(-2) * x.size(-1))


class GPT2Block(nn.Module):
    """Pre-LN block: fused ``c_attn`` (Q, K, V in one Linear, split), causal mask from a buffer, tanh GELU MLP."""
    bias: torch.Tensor

    def __init__(self, dim: int, heads: int, mlp: int, ctx: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.register_buffer("bias", torch.tril(torch.ones(ctx, ctx, dtype=torch.bool)).view(1, 1, ctx, ctx), persistent=False)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.c_proj.in_features, dim=2)
        q, k, v = _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
        length = q.size(-2)
        causal = self.bias[:, :, :length, :length]
        w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        return self.c_proj(_merge(torch.matmul(w.softmax(-1), v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LM(nn.Module):
    """GPT-2-style causal LM: token + learned position embeddings, pre-LN blocks, final LN, tied head."""

    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 2, heads: int = 4, mlp: int = 64, ctx: int = 64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.h = nn.ModuleList(GPT2Block(dim, heads, mlp, ctx) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class BertLayer(nn.Module):
    """Post-LN layer: separate Q/K/V, additive padding mask, exact GELU feed-forward."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.ln_attn = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-12)
        self.intermediate, self.output = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.ln_out = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(p(x), self.heads) for p in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        x = self.ln_attn(x + self.attn_out(_merge(torch.matmul(scores.softmax(-1), v))))
        return self.ln_out(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT-style classifier: word + position + type embeddings, LN, post-LN layers, tanh pooler on token 0."""

    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 2, heads: int = 4, mlp: int = 64,
                 ctx: int = 64, classes: int = 2, pad: int = 0):
        super().__init__()
        self.pad = pad
        self.word, self.position, self.token_type = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim), nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(dim, heads, mlp) for _ in range(depth))
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)
        x = self.ln(self.word(ids) + self.position(pos) + self.token_type(torch.zeros_like(ids)))
        mask = (ids == self.pad).to(x.dtype)[:, None, None, :] * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """RMSNorm, grouped-query attention (``repeat_kv`` by expand + reshape), rotary embeddings, SwiGLU."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.input_norm, self.post_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(dim, mlp, bias=False), nn.Linear(dim, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, dim, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        n, kv, length, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None, :, :].expand(n, kv, rep, length, d).reshape(n, kv * rep, length, d)

    def _attn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(*x.shape[:-1], -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self._attn(self.input_norm(x), cos, sin)
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    """Llama-style causal LM: embeddings, Llama blocks, final RMSNorm, untied head."""
    inv_freq: torch.Tensor

    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 2, heads: int = 4, kv_heads: int = 2,
                 mlp: int = 64, theta: float = 10000.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, mlp) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // heads
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))
