"""Linear probe on frozen image features, CLIP_benchmark's recipe (`clip_benchmark/metrics/linear_probe.py`).

A logistic regression (one `nn.Linear`, cross-entropy, AdamW, cosine learning rate without warm-up, `epochs`
passes over shuffled mini-batches) is trained on L2-normalised image features. With a validation share, the
weight decay is chosen the way CLIP_benchmark follows the CLIP paper (A.3): accuracy on the validation split
at 7 log-spaced values of a 97-point grid over [1e-6, 1e2], then a binary refinement around the best (steps
8, 4, 2, 1); the final probe is trained on train + validation with that weight decay. Without one, the weight
decay is 0, as in CLIP_benchmark. Training runs on the CPU: features are small and this keeps the result
independent of the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipserve.eval.metrics import classification_metrics, topk_accuracy

WEIGHT_DECAYS: tuple[float, ...] = tuple(np.logspace(-6, 2, num=97).tolist())
INITIAL_WEIGHT_DECAYS: tuple[int, ...] = tuple(range(0, 97, 16))  # indices of logspace(-6, 2, num=7) in the grid
REFINE_STEPS: tuple[int, ...] = (8, 4, 2, 1)


@dataclass(frozen=True)
class ProbeSettings:
    """CLIP_benchmark's defaults: 10 epochs, learning rate 0.1, batch size 64, seed 0."""

    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 64
    val_proportion: float = 0.2
    seed: int = 0


def train_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, settings: ProbeSettings
) -> torch.nn.Linear:
    """A logistic regression fitted with AdamW and a cosine schedule, seeded so repeated fits are identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = torch.nn.Linear(features.shape[1], num_classes)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(features) / settings.batch_size)
        total_steps = settings.epochs * steps_per_epoch
        step = 0
        for _ in range(settings.epochs):
            order = torch.randperm(len(features))
            for batch in order.split(settings.batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total_steps)) * settings.lr
                optimizer.zero_grad()
                loss = F.cross_entropy(probe(features[batch]), labels[batch])
                loss.backward()
                optimizer.step()
                step += 1
    return probe


@torch.no_grad()
def _accuracy(probe: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    return topk_accuracy(probe(features), labels, (1,))[0]


def choose_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    settings: ProbeSettings,
    progress: bool = True,
) -> float:
    """CLIP_benchmark's sweep: coarse grid, then binary refinement around the best validation accuracy."""
    scores: dict[int, float] = {}
    bar = tqdm(total=len(INITIAL_WEIGHT_DECAYS) + 3 * len(REFINE_STEPS), desc="weight-decay sweep",
               disable=None if progress else True, leave=False)

    def best_of(indices: list[int]) -> int:
        best, best_accuracy = 0, 0.0  # CLIP_benchmark starts from grid index 0, even when not among `indices`
        for index in indices:
            if index not in scores:
                probe = train_probe(*train, num_classes, WEIGHT_DECAYS[index], settings)
                scores[index] = _accuracy(probe, *val)
            bar.update()
            if scores[index] > best_accuracy:  # strictly better, first wins ties (as CLIP_benchmark)
                best, best_accuracy = index, scores[index]
        return best

    peak = best_of(list(INITIAL_WEIGHT_DECAYS))
    for span in REFINE_STEPS:
        peak = best_of([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
    bar.close()
    return WEIGHT_DECAYS[peak]


def split_validation(
    features: torch.Tensor, labels: torch.Tensor, proportion: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random (train, validation) split of the training features."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(features) * proportion))
    if n_val == 0 or n_val == len(features):
        raise ValueError(f"a validation share of {proportion} leaves no training or no validation samples")
    val, train = order[:n_val], order[n_val:]
    return (features[train], labels[train]), (features[val], labels[val])


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: ProbeSettings = ProbeSettings(),
    progress: bool = True,
) -> dict[str, float]:
    """`lp_acc1`, `lp_acc5` (with at least 5 classes), `lp_mean_per_class_recall`, and the probe's
    `weight_decay`, `epochs` and `seed` as CLIP_benchmark reports them. Features must be L2-normalised."""
    train_features, test_features = train_features.float().cpu(), test_features.float().cpu()
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    if settings.val_proportion > 0:
        train, val = split_validation(train_features, train_labels, settings.val_proportion, settings.seed)
        weight_decay = choose_weight_decay(train, val, num_classes, settings, progress)
    else:
        weight_decay = 0.0
    probe = train_probe(train_features, train_labels, num_classes, weight_decay, settings)
    with torch.no_grad():
        logits = probe(test_features)
    metrics = {f"lp_{name}": value for name, value in classification_metrics(logits, test_labels, num_classes).items()}
    metrics.update(weight_decay=weight_decay, epochs=settings.epochs, seed=settings.seed)
    return metrics
