"""CLIP text tower: a causal transformer pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from clipserve.config import TextConfig
from clipserve.models.layers import LayerNorm, Transformer


class TextTransformer(nn.Module):
    """Token + position embeddings -> causal pre-norm blocks -> ln_final -> EOT token @ text_projection.

    open_clip keeps these modules directly on the CLIP module (keys `token_embedding.weight`,
    `positional_embedding`, ...); `clipserve.models.clip.CLIP` registers them the same way.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, quick_gelu)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= context_length, EOT = largest id) -> text embeddings [B, embed_dim]."""
        eot = tokens.argmax(dim=-1)  # EOT (49407) is the largest id; one per row
        # The causal mask means no position attends past itself, so columns after the last EOT in the
        # batch cannot change any pooled output: drop them (exact, and 77 -> ~16 positions for prompts).
        length = int(eot.max()) + 1
        tokens = tokens[:, :length]
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, causal=True)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        return pooled @ self.text_projection
