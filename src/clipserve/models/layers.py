"""Building blocks shared by the image and text towers.

Parameter names follow open_clip's (`ln_1`, `attn.in_proj_weight`, `mlp.c_fc`, ...) so that published
checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so bf16/fp16 weights keep fp32 statistics.

    In fp32 it is exactly nn.LayerNorm (eps 1e-5, as every open_clip config uses).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's original CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's packed q/k/v parameters."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> packed q/k/v [B, L, 3W]; a method so that quantised variants can replace it."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: torch.Tensor, causal: bool = False, queries: int | None = None) -> torch.Tensor:
        """[B, L, W] -> [B, L, W], or with `queries` the outputs of the first `queries` tokens only [B, Q, W]
        (every token still serves as a key and value)."""
        batch, length, width = x.shape
        qkv = self.in_projection(x)  # [B, L, 3W]
        # [B, L, 3, H, Dh] -> 3 x [B, H, L, Dh]
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if queries is not None:
            if causal:  # a causal mask over fewer queries than keys would need aligning; no caller needs it
                raise ValueError("Attention: queries= is for bidirectional attention only")
            q = q[:, :, :queries]  # [B, H, Q, Dh]
        out = self.attend(q, k, v, causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, q.shape[2], width))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """Scaled dot-product attention, q [B, H, Q, Dh] (Q <= L), k, v [B, H, L, Dh] -> [B, H, Q, Dh]; a
        method so that fast variants can replace it."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(quick_gelu)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, mlp_width, quick_gelu)

    def forward(self, x: torch.Tensor, causal: bool = False, queries: int | None = None) -> torch.Tensor:
        """[B, L, W] -> [B, L, W]; with `queries`, the first `queries` tokens' outputs only [B, Q, W]."""
        x = x[:, :queries] + self.attn(self.ln_1(x), causal=causal, queries=queries)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, quick_gelu) for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, pooled_tokens: int | None = None) -> torch.Tensor:
        """[B, L, W] -> [B, L, W]. With `pooled_tokens` (a tower that reads only its first tokens, the ViT's
        class token) the last block computes those tokens' outputs alone, [B, pooled_tokens, W]: the same
        values, without its output projection and MLP for the other tokens (1/16 of a ViT-B/32's GEMM work)."""
        last = len(self.resblocks) - 1
        for index, block in enumerate(self.resblocks):
            queries = pooled_tokens if index == last else None
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, causal, queries, use_reentrant=False)
            else:
                x = block(x, causal=causal, queries=queries)
        return x
