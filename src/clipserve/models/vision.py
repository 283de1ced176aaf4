"""ViT image tower (Dosovitskiy et al. 2021, as used by CLIP and open_clip)."""

from __future__ import annotations

import torch
from torch import nn

from clipserve.config import VisionConfig
from clipserve.models.layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """Patchify -> [CLS] + patches + positions -> ln_pre -> pre-norm blocks -> ln_post -> CLS @ proj."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (normalised) -> image embeddings [B, embed_dim] (not normalised)."""
        x = self.conv1(pixels)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+g*g, W]
        # Only the class token is read: the last block computes its output alone. open_clip applies ln_post
        # to every token and then takes the class token; per-token LayerNorm makes that the same.
        x = self.transformer(self.ln_pre(x), pooled_tokens=1)  # [B, 1, W]
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj
