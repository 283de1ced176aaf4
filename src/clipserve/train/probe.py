"""Linear probes as a product: a linear classifier on a model's frozen, L2-normalised image features.

Fitting is the evaluation harness's CLIP_benchmark recipe (`clipserve.eval.linear_probe`); this module adds
what serving needs: class names, saving, loading and prediction.

A probe directory holds `probe.safetensors` (`weight` [classes, embed_dim], `bias` [classes]) and `probe.json`
(class names, the embedding size, and the model it was trained on), so a server can offer a fixed-class
classifier next to zero-shot classification: `LinearProbe.load(dir).classify(model, images)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipserve.engine.model import Model
from clipserve.eval.datasets import ClassificationSet
from clipserve.eval.linear_probe import ProbeSettings, choose_weight_decay, split_validation, train_probe
from clipserve.eval.runner import EvalConfig, encode_images
from clipserve.io.checkpoints import atomic_write, read_safetensors, write_safetensors
from clipserve.io.images import ImageInput

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
PROBE_FORMAT = "clipserve-linear-probe-v1"


class ProbeError(ValueError):
    """A probe directory that cannot be read, or a probe that does not fit the model."""


@dataclass
class LinearProbe:
    classes: tuple[str, ...]
    weight: torch.Tensor  # [len(classes), embed_dim]
    bias: torch.Tensor  # [len(classes)]
    model: str  # source of the model whose features it was trained on

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, len(classes)] for image features [N, embed_dim] (normalised here)."""
        if features.ndim != 2 or features.shape[1] != self.embed_dim:
            raise ProbeError(f"expected features [N, {self.embed_dim}], got {tuple(features.shape)}")
        return (F.normalize(features.float(), dim=-1) @ self.weight.T + self.bias).softmax(dim=-1)

    def classify(self, model: Model, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Class probabilities for images, through `model`'s image tower."""
        if model.embed_dim != self.embed_dim:
            raise ProbeError(f"probe expects {self.embed_dim}-d features, model {model.info.name} gives {model.embed_dim}")
        return self.predict(model.encode_image(images, normalize=True))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / PROBE_WEIGHTS, {"weight": self.weight, "bias": self.bias})
        meta = {"format": PROBE_FORMAT, "classes": list(self.classes), "embed_dim": self.embed_dim, "model": self.model}
        atomic_write(directory / PROBE_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LinearProbe:
        directory = Path(directory)
        meta_path = directory / PROBE_META
        if not meta_path.is_file():
            raise ProbeError(f"{directory}: not a linear probe (no {PROBE_META})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ProbeError(f"{meta_path}: invalid JSON: {exc.msg}") from None
        if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
            raise ProbeError(f"{meta_path}: format is not {PROBE_FORMAT!r}")
        tensors = read_safetensors(directory / PROBE_WEIGHTS)
        weight, bias = tensors.get("weight"), tensors.get("bias")
        classes = tuple(meta["classes"])
        if weight is None or bias is None or weight.shape != (len(classes), meta["embed_dim"]) or bias.shape != (len(classes),):
            raise ProbeError(f"{directory}: weights do not match {len(classes)} classes of {meta['embed_dim']}-d features")
        return cls(classes=classes, weight=weight.float().clone(), bias=bias.float().clone(), model=str(meta["model"]))


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], model: str, settings: ProbeSettings
) -> LinearProbe:
    """CLIP_benchmark's probe recipe (the evaluation harness's): weight decay chosen on a validation share of
    the data when `settings.val_proportion` > 0, then a fit on all of it."""
    features, labels = F.normalize(features.float(), dim=-1), labels.long()
    weight_decay = 0.0
    if settings.val_proportion > 0:
        train, val = split_validation(features, labels, settings.val_proportion, settings.seed)
        weight_decay = choose_weight_decay(train, val, len(classes), settings, progress=False)
    linear = train_probe(features, labels, len(classes), weight_decay, settings)
    return LinearProbe(tuple(classes), linear.weight.detach().clone(), linear.bias.detach().clone(), model)


def train_linear_probe(model: Model, dataset: ClassificationSet, settings: ProbeSettings = ProbeSettings()) -> LinearProbe:
    """Fit a probe on a labelled dataset from the evaluation harness (`clipserve.eval.datasets.load_dataset`)."""
    if len(dataset.classnames) < 2:
        raise ProbeError(f"a probe needs at least two classes, {dataset.spec!r} has {dataset.classnames}")
    features = encode_images(model, dataset.images, EvalConfig(dataset.spec, "linear_probe", progress=False))
    return fit_linear_probe(features, torch.tensor(dataset.labels), dataset.classnames, model.info.source, settings)
