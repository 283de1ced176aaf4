"""Symmetric InfoNCE (CLIP's contrastive loss) over the global batch, in open_clip's local-loss formulation.

Each rank gathers every rank's features *with gradients* (`torch.distributed.nn.functional.all_gather`, whose
backward sums the gradients back to their owners) and scores its local features against all of them; its
labels are offset by rank. The mean of the local losses over ranks is then exactly the loss of one process
holding the whole global batch, and so are the gradients once they are averaged over ranks (what DDP does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from clipserve.train.distributed import DistContext


def gather_with_grad(features: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return features
    return torch.cat(all_gather(features), dim=0)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    ctx: DistContext = DistContext(),
) -> torch.Tensor:
    """This rank's share of the global-batch loss. Features are L2-normalised [n, D]; logit_scale is exp'd."""
    all_images = gather_with_grad(image_features, ctx)
    all_texts = gather_with_grad(text_features, ctx)
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + n * ctx.rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
