"""Metrics exactly as CLIP_benchmark 1.6.2 defines them (`clip_benchmark/metrics/*.py`).

Classification: top-k accuracy = share of samples whose target is among the k highest logits; mean per-class
recall = scikit-learn's `balanced_accuracy_score` (mean over the classes present in the targets of their
recall). Retrieval: `image_retrieval_recall@k` ranks images for each caption (one query per caption);
`text_retrieval_recall@k` ranks captions for each image, a hit when any of its captions is in the top k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Rows of the similarity matrix scored at once: bounds memory on COCO (25k captions x 5k images).
RETRIEVAL_CHUNK = 2048


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """For each k, the share of rows whose target is among the k highest logits."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == targets.view(-1, 1)
    return [int(hits[:, :k].sum()) / len(targets) for k in ks]


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Balanced accuracy: recall averaged over the classes that occur in `targets`."""
    recalls = [
        float((predictions[targets == c] == c).double().mean()) for c in torch.unique(targets).tolist()
    ]
    return sum(recalls) / len(recalls)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """`acc1`, `acc5` (only with at least 5 classes; CLIP_benchmark writes NaN, which is not JSON) and
    `mean_per_class_recall`."""
    targets = targets.long()
    ks = (1, 5) if num_classes >= 5 else (1,)
    accuracies = topk_accuracy(logits, targets, ks)
    metrics = {f"acc{k}": value for k, value in zip(ks, accuracies, strict=True)}
    metrics["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), targets)
    return metrics


def _hits_at_k(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    is_positive_rank: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ks: Sequence[int],
) -> torch.Tensor:
    """Hits [len(ks)] summed over queries; `is_positive_rank(rows, topk_indices)` marks positives in the top k."""
    hits = torch.zeros(len(ks), dtype=torch.long)
    for start in range(0, len(queries), RETRIEVAL_CHUNK):
        rows = torch.arange(start, min(start + RETRIEVAL_CHUNK, len(queries)))
        scores = queries[rows] @ candidates.T
        top = scores.topk(max(ks), dim=1).indices
        positive = is_positive_rank(rows, top)
        for i, k in enumerate(ks):
            hits[i] += int(positive[:, :k].any(dim=1).sum())
    return hits


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways from L2-normalised features; `text_to_image[t]` is the image caption t describes.

    k must not exceed the number of candidates (images for image retrieval, captions for text retrieval).
    """
    n_images, n_texts = len(image_features), len(text_features)
    if max(ks) > n_images:
        raise ValueError(f"recall@{max(ks)} needs at least {max(ks)} images, the dataset has {n_images}")
    text_to_image = text_to_image.long()
    image_hits = _hits_at_k(
        text_features, image_features, lambda rows, top: top == text_to_image[rows].view(-1, 1), ks
    )
    text_hits = _hits_at_k(
        image_features, text_features, lambda rows, top: text_to_image[top] == rows.view(-1, 1), ks
    )
    metrics: dict[str, float] = {}
    for i, k in enumerate(ks):
        metrics[f"image_retrieval_recall@{k}"] = int(image_hits[i]) / n_texts
        metrics[f"text_retrieval_recall@{k}"] = int(text_hits[i]) / n_images
    return metrics
