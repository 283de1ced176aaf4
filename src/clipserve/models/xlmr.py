"""XLM-RoBERTa text tower (Conneau et al. 2020) with open_clip's masked mean pooling and MLP projection.

Written from the published architecture so that no `xlm-roberta-base` config or code is fetched at run
time. Parameter names follow transformers' `XLMRobertaModel` under `transformer.`, as open_clip stores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipserve.config import XLMRobertaConfig
from clipserve.models.layers import LayerNorm


class Embeddings(nn.Module):
    def __init__(self, cfg: XLMRobertaConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.width, padding_idx=cfg.pad_token_id)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # RoBERTa positions count real tokens from padding_idx + 1; pads sit at padding_idx.
        positions = torch.cumsum(mask, dim=1) * mask + self.pad_token_id
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)


class AttentionOutput(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = LayerNorm(width, eps=eps)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = SelfAttention(width)
        self.output = AttentionOutput(width, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, H, L, Dh]
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(self.self.query(x)), heads(self.self.key(x)), heads(self.self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.output.LayerNorm(self.output.dense(out) + x)  # post-norm


class Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class Output(nn.Module):
    def __init__(self, hidden: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, width)
        self.LayerNorm = LayerNorm(width, eps=eps)


class Layer(nn.Module):
    def __init__(self, cfg: XLMRobertaConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg.width, cfg.heads, cfg.layer_norm_eps)
        self.intermediate = Intermediate(cfg.width, cfg.mlp_width)
        self.output = Output(cfg.mlp_width, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class Encoder(nn.Module):
    def __init__(self, cfg: XLMRobertaConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))


class XLMRoberta(nn.Module):
    def __init__(self, cfg: XLMRobertaConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids, mask)
        # Additive key mask [B, 1, 1, L]: pads get the dtype's most negative value, as transformers does.
        key_mask = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x


class XLMRobertaTextTower(nn.Module):
    """ids [B, L] -> XLM-R -> mean over non-pad tokens -> Linear-GELU-Linear (no biases) -> [B, embed_dim]."""

    def __init__(self, cfg: XLMRobertaConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = XLMRoberta(cfg)
        hidden = (cfg.width + embed_dim) // 2
        self.proj = nn.Sequential(
            nn.Linear(cfg.width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
        )

    def token_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions each row needs: up to and including its last non-pad token."""
        positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
        return ((ids != self.cfg.pad_token_id).long() * positions).max(dim=1).values

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Pads are masked out as keys, so trailing all-pad columns change no real token's output. Drop them.
        return self.encode_trimmed(ids[:, : max(int(self.token_lengths(ids).max()), 1)])

    def encode_trimmed(self, ids: torch.Tensor) -> torch.Tensor:
        """`forward` without the data-dependent trim, so that a traced graph keeps the length dynamic."""
        mask = (ids != self.cfg.pad_token_id).long()
        x = self.transformer(ids, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        return self.proj(pooled)
