"""A CLIP we train ourselves: scikit-learn's 1,797 handwritten 8x8 digits, captioned from their labels.

The point is a model that really does something and that any test can have in seconds, without the network:
`train_digits_model(dir)` trains a small CLIP from scratch through the ordinary trainer (CLIP tokenizer and
vocabulary, 32 px images upscaled by the runtime's preprocessing), and `cached_digits_model()` keeps one per
recipe under `$CLIPSERVE_CACHE` (default `~/.cache/clipserve`). Zero-shot classification of the held-out
digits goes through `Model.classify` with prompt templates, like any published checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipserve.config import PreprocessConfig, model_config_from_open_clip
from clipserve.engine.loading import ResolvedCheckpoint
from clipserve.engine.model import Model
from clipserve.train.config import TrainConfig
from clipserve.train.data import Record
from clipserve.train.trainer import TRAINING_STATE, train

# Bump when anything that changes the trained weights changes outside MODEL_CFG and the recipe below
# (captions, split, trainer numerics): the cache key includes it.
DIGITS_VERSION = 3
HELD_OUT = 360  # fixed split: a seeded permutation's first 360 digits are held out, the other 1,437 train
SPLIT_SEED = 0

CLASSNAMES = tuple(str(d) for d in range(10))
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the numeral, {w}: the word. Both forms appear so the text tower learns that they mean the same digit.
CAPTIONS = (
    "a handwritten {d}",
    "the digit {w}",
    "a photo of the number {d}",
    "a handwritten {w}",
    "the number {w}, written by hand",
    "a scan of the digit {d}",
    "a small blurry {d}",
    "an image of a handwritten {w}",
    "the handwritten digit {d}",
    "a picture of the number {w}",
    "a {d} written by hand",
    "a low resolution {w}",
)
TEMPLATES = ("a photo of the number {}.", "a handwritten {}.", "the digit {}.")

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    # The text tower is the harder side (24 phrasings, numerals and words, one meaning): it gets the width.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
METRICS_FILE = "digits_metrics.json"


def recipe(output: Path) -> TrainConfig:
    # Measured on held-out digits (zero-shot through Model.classify): batch 32 / lr 2e-3 to 3e-3 / 30 epochs
    # gives 0.91-0.94 across seeds; batch 64 at lr 4e-3 collapsed, batch 16 and 20 epochs stayed near 0.7-0.8.
    # Small batches also keep same-digit false negatives (10 classes) rare within a batch.
    return TrainConfig(
        output=output, epochs=30, batch_size=32, lr=2e-3, wd=0.1, warmup=40, grad_clip=1.0, seed=0,
        progress=False, eval_every=0, log_every=20,
    )


@dataclass(frozen=True)
class DigitsSplit:
    images: list[Image.Image]  # 8x8 grayscale ("L")
    labels: list[int]
    captions: list[str]  # one phrasing per image, for retrieval metrics

    def records(self) -> list[Record]:
        """Every phrasing of each image's label: training draws one per image and epoch, so the text tower
        sees all of them (a single fixed caption per image left it at ~0.7 zero-shot accuracy)."""
        return [
            Record(image, tuple(c.format(d=label, w=WORDS[label]) for c in CAPTIONS))
            for image, label in zip(self.images, self.labels, strict=True)
        ]


@lru_cache(maxsize=2)
def load_split(split: str) -> DigitsSplit:
    """"train" (1,437 digits) or "heldout" (360): images, labels and one caption per image."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    indices = order[:HELD_OUT] if split == "heldout" else order[HELD_OUT:]
    images, labels, captions = [], [], []
    for i in indices.tolist():
        label = int(digits.target[i])
        pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
        images.append(Image.fromarray(pixels, "L"))
        labels.append(label)
        captions.append(CAPTIONS[(i * 7 + label) % len(CAPTIONS)].format(d=label, w=WORDS[label]))
    return DigitsSplit(images, labels, captions)


def starting_point() -> ResolvedCheckpoint:
    model_cfg = model_config_from_open_clip(MODEL_CFG, "digits")
    return ResolvedCheckpoint(
        name="digits", architecture="digits", source="digits", model_cfg=model_cfg,
        preprocess_cfg=PreprocessConfig(size=model_cfg.image_size), state={},
    )


def evaluate(model: Model, split: str = "heldout") -> dict[str, float]:
    """Zero-shot accuracy through `Model.classify` and text-to-image Recall@5 (each caption's own image)."""
    data = load_split(split)
    probs = model.classify(data.images, CLASSNAMES, TEMPLATES)
    accuracy = (probs.argmax(dim=1) == torch.tensor(data.labels)).float().mean().item()
    images = model.encode_image(data.images, normalize=True)
    texts = model.encode_text(data.captions, normalize=True)
    return {"zeroshot_accuracy": accuracy, "text_to_image_recall@5": recall_at_k(texts, images, 5)}


def recall_at_k(queries: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of queries whose own target (same row) is among the k most similar targets."""
    top = (queries @ targets.T).topk(k, dim=1).indices
    return (top == torch.arange(len(queries)).unsqueeze(1)).any(dim=1).float().mean().item()


def train_digits_model(output_dir: str | Path) -> Path:
    """Train the digits CLIP from scratch into `output_dir` (a servable checkpoint) and write its held-out
    metrics and training time to `digits_metrics.json` there."""
    output = Path(output_dir)
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from more threads, and OpenMP's spinning threads slow to a crawl on a
    # shared, oversubscribed CPU (30x measured), so train on one.
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        train(recipe(output), starting_point(), load_split("train").records())
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    from clipserve.engine.loading import load

    metrics = evaluate(load(str(output)))
    metrics["train_seconds"] = seconds
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return output


def cache_key() -> str:
    r = recipe(Path("."))
    payload = {"version": DIGITS_VERSION, "model": MODEL_CFG, "recipe": r.fingerprint(), "captions": CAPTIONS,
               "torch": ".".join(torch.__version__.split(".")[:2])}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("CLIPSERVE_CACHE") or Path.home() / ".cache" / "clipserve")


def _is_complete(directory: Path) -> bool:
    return (directory / METRICS_FILE).is_file() and (directory / "open_clip_model.safetensors").is_file()


def cached_digits_model(root: str | Path | None = None) -> Path:
    """The digits checkpoint for the current recipe, trained on first use and reused afterwards.

    Lives in `ROOT/digits-v1-KEY` (KEY hashes the recipe). Concurrent callers wait on a file lock instead of
    training twice; the directory appears by an atomic rename only once complete.
    """
    root = Path(root) if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"digits-v{DIGITS_VERSION}-{cache_key()}"
    if _is_complete(final):
        return final
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(final):
            return final
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
        try:
            train_digits_model(staging)
            (staging / TRAINING_STATE).unlink()  # a served cache entry is never resumed: keep it small
            if final.exists():  # an incomplete leftover of an interrupted run
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


__all__ = [
    "CLASSNAMES",
    "TEMPLATES",
    "cached_digits_model",
    "evaluate",
    "load_split",
    "recall_at_k",
    "train_digits_model",
]

