"""CLIP (Radford et al. 2021): an image tower and a text tower projected into one embedding space.

Module names: `visual` (image tower), `text` (text tower), `logit_scale`. open_clip's standard layout keeps
the CLIP text modules at the top level (`token_embedding.weight`, ...); `clipserve.io.checkpoints` maps
between that layout and this one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipserve.config import ModelConfig, XLMRobertaConfig
from clipserve.models.text import TextTransformer
from clipserve.models.vision import VisionTransformer
from clipserve.models.xlmr import XLMRobertaTextTower


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        if isinstance(cfg.text, XLMRobertaConfig):
            self.text: nn.Module = XLMRobertaTextTower(cfg.text, cfg.embed_dim)
        else:
            self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.class_embedding.dtype

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if pixels.is_floating_point():  # uint8 pixels go as they are, to a patch embedding that normalises them
            pixels = pixels.to(self.dtype)
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positions each row of token ids needs (the text tower trims a batch to its longest row)."""
        return self.text.token_lengths(tokens)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and exp(logit_scale), as open_clip's CLIP.forward returns."""
        return self.encode_image(pixels, True), self.encode_text(tokens, True), self.logit_scale.exp()

    def init_weights(self, seed: int | None = None) -> CLIP:
        """Random initialisation in open_clip's scheme (for training from scratch and for tests)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal(t: torch.Tensor, std: float) -> None:
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=gen) * std)

        for name, p in self.named_parameters():
            if name == "logit_scale":
                with torch.no_grad():
                    p.fill_(math.log(1 / 0.07))
            elif "LayerNorm" in name or ".ln_" in name or name.startswith(("visual.ln_", "text.ln_")):
                with torch.no_grad():
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                with torch.no_grad():
                    p.zero_()
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
                if "proj" in name.rsplit(".", 1)[-1] and p.ndim == 2 and not name.endswith("weight"):
                    fan_in = p.shape[0]  # x @ proj: fan-in is the first dimension
                normal(p, fan_in**-0.5)
        return self
