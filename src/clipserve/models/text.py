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

    @staticmethod
    def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
        """Positions each row needs: up to and including its EOT (49407, the largest id; one per row)."""
        return tokens.argmax(dim=-1) + 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= context_length, EOT = largest id) -> text embeddings [B, embed_dim]."""
        # The causal mask means no position attends past itself, so columns after the last EOT in the
        # batch cannot change any pooled output: drop them (exact, and 77 -> ~16 positions for prompts).
        return self.encode_trimmed(tokens[:, : int(self.token_lengths(tokens).max())])

    def encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` without the data-dependent trim, so that a traced graph keeps the length dynamic."""
        eot = tokens.argmax(dim=-1)
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, causal=True)
        pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        return pooled @ self.text_projection
