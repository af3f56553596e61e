"""THE generation block: joint attention over [context ; image] with QK-norm, SwiGLU FFN.

A fusion strategy never copies this class: it hands the block its context tokens (in-context
fusion, Eq. 4) and nothing else changes. Only the image stream (image tokens + registers) is
carried from block to block; the context is fresh at every block, so the block computes keys
and values for the context but no queries, no attention output and no FFN for it. That is
exactly what the naive "concatenate, run everything, drop the context outputs" computes,
because those outputs are thrown away (tests/test_blocks.py checks it).

Image tokens carry 2-D rotary positions on their queries and keys; context tokens are not
rotated, so a routed state is equally visible from every image position.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from .embeddings import apply_rope


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), keys where `mask` is False left out) v; q (B, H, N, d), k and v (B, H, S, d),
    mask (B, 1, 1, S) bool. On CPU it is written out, with the softmax in (at least) float32: torch's math SDPA kernel
    computes bf16 inputs in float32 throughout and its flash kernel's backward is slower still, at our
    short sequences (docs/performance.md). Elsewhere the fused kernels."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def ffn_hidden(dim: int, mlp_ratio: float = 4.0, multiple: int = 1) -> int:
    """SwiGLU's hidden width: 2/3 of mlp_ratio x dim (the parameters of a plain 4x MLP), rounded up to a multiple
    of `multiple`. On a GPU an odd width (5461 at dim 2048) runs its matmuls at a third of the aligned rate
    (benchmarks/results/gpu_nvidia-h200_2026-12-04.md); 1 keeps the width as computed."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"ffn_multiple={multiple!r}: must be an int >= 1")
    return -(-int(dim * mlp_ratio * 2 / 3) // multiple) * multiple


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """One generation-tower block (App. A: QK-norm, modality-specific norms, registers upstream).
    `context=False` builds it for self-attention only (the router's blocks): no norm for context tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context: bool = True, ffn_multiple: int = 1):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"generation.width ({dim}) must be divisible by generation.heads ({heads})")
        self.heads = heads
        self.norm_image = nn.RMSNorm(dim)
        self.norm_context = nn.RMSNorm(dim) if context else None  # modality-specific norm for the routed states
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_norm = nn.RMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_ffn = nn.RMSNorm(dim)
        self.ffn = SwiGLU(dim, ffn_hidden(dim, mlp_ratio, ffn_multiple))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = rearrange(self.kv(x), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        return self.k_norm(k), v

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_norm(rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                stream_mask: torch.Tensor | None = None, cross: Callable[[torch.Tensor], torch.Tensor] | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, N, D) carried stream; context: (B, L, D) in-context tokens (keys/values only);
        context_kv: ready (k, v) of (B, H, L, d) instead of context tokens (MoT: the tower's own);
        context_mask: (B, L) and stream_mask: (B, N) bool, False where a padded token is;
        cross: a residual sub-layer between attention and FFN (cross-attention fusion);
        rope: (cos, sin) of (N, d) for the carried stream (embeddings.rope_2d), None for no rotation."""
        h = self.norm_image(x)
        k, v = self.keys_values(h)  # (B, H, N, d)
        q = self.query(h)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if context is not None:
            context_kv = self.keys_values(self.norm_context(context))  # (B, H, L, d) each
        elif context_kv is not None:
            context_kv = (self.k_norm(context_kv[0].to(k.dtype)), context_kv[1].to(v.dtype))  # QK-norm scale
        if context_kv is not None:
            k, v = torch.cat([context_kv[0], k], dim=2), torch.cat([context_kv[1], v], dim=2)
        mask = _key_mask(context_mask, stream_mask, None if context_kv is None else context_kv[0].shape[2], x)
        attn = attention(q, k, v, mask)
        x = x + self.out(rearrange(attn, "b h n d -> b n (h d)"))
        if cross is not None:
            x = x + cross(x)
        return x + self.ffn(self.norm_ffn(x))


def _key_mask(context_mask, stream_mask, num_context: int | None, x) -> torch.Tensor | None:
    """(B, 1, 1, L + N) bool over [context ; stream] keys: padded tokens are never attended."""
    if context_mask is None and stream_mask is None:
        return None
    batch = x.shape[0]
    parts = []
    if num_context is not None:
        parts.append(context_mask if context_mask is not None else x.new_ones(batch, num_context, dtype=torch.bool))
    parts.append(stream_mask if stream_mask is not None else x.new_ones(batch, x.shape[1], dtype=torch.bool))
    return torch.cat(parts, dim=1)[:, None, None, :]


def naive_block(block: Block, x, context, context_mask, rope=None):
    """Reference for tests and benchmarks: concatenate [context ; image], run every sub-layer on every
    token, then drop the context outputs. What `Block.forward` saves. `rope` rotates the image rows only."""
    tokens = torch.cat([block.norm_context(context), block.norm_image(x)], dim=1)
    residual = torch.cat([context, x], dim=1)
    q = block.q_norm(rearrange(block.q(tokens), "b l (h d) -> b h l d", h=block.heads))
    k, v = rearrange(block.kv(tokens), "b l (two h d) -> two b h l d", two=2, h=block.heads)
    k = block.k_norm(k)
    if rope is not None:  # context rows get angle 0: cos 1, sin 0
        cos, sin = rope
        rows = (context.shape[1], cos.shape[1])
        padded = (torch.cat([cos.new_ones(rows), cos]), torch.cat([sin.new_zeros(rows), sin]))
        q, k = apply_rope(q, padded), apply_rope(k, padded)
    keep = torch.cat([context_mask, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    attn = rearrange(attn, "b h l d -> b l (h d)")
    out = residual + block.out(attn)
    out = out + block.ffn(block.norm_ffn(out))
    return out[:, context.shape[1]:]
