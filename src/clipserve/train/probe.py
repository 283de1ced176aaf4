"""Linear probes: a linear classifier on a model's frozen, L2-normalised image features.

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
from clipserve.io.checkpoints import atomic_write, read_safetensors, write_safetensors
from clipserve.io.images import ImageInput
from clipserve.train.data import Record, load_image

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
    features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], model: str, l2: float = 1e-4, max_iter: int = 200
) -> LinearProbe:
    """Multinomial logistic regression (cross-entropy + l2/2 ||W||^2) by full-batch L-BFGS: deterministic."""
    features = F.normalize(features.float(), dim=-1)
    weight = torch.zeros(len(classes), features.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(tuple(classes), weight.detach(), bias.detach(), model)


def train_linear_probe(model: Model, records: Sequence[Record], l2: float = 1e-4, max_iter: int = 200) -> LinearProbe:
    """Fit a probe on labelled records (record text = class name); classes are sorted names."""
    classes = sorted({r.text for r in records})
    if len(classes) < 2:
        raise ProbeError(f"a probe needs at least two classes, the data has {classes}")
    index = {name: i for i, name in enumerate(classes)}
    chunks = [
        model.encode_image([load_image(r.image) for r in records[i : i + model.batch_size]], normalize=True)
        for i in range(0, len(records), model.batch_size)
    ]
    labels = torch.tensor([index[r.text] for r in records])
    return fit_linear_probe(torch.cat(chunks), labels, classes, model.info.source, l2, max_iter)
