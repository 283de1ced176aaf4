"""Run one evaluation task on a loaded `Model`: encode the dataset in batches, then score it.

Images are decoded and preprocessed by the model's own `Preprocessor` in a few threads (Pillow releases the
GIL while decoding and resizing) while the model encodes the previous batches; embeddings come from
`Model.encode_pixels` / `Model.encode_tokens` and zero-shot classifiers from `Model.text_classifier`, the same
code paths the server uses, at the precision the model was loaded with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from clipserve.engine.model import Model
from clipserve.eval import prompts
from clipserve.eval.datasets import (
    ClassificationSet,
    DatasetError,
    EvalSet,
    ImageRef,
    RetrievalSet,
    has_splits,
    load_dataset,
    read_image_source,
)
from clipserve.eval.linear_probe import ProbeSettings, linear_probe
from clipserve.eval.metrics import classification_metrics, retrieval_metrics
from clipserve.io.images import ImageError, open_image

TASKS: tuple[str, ...] = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
DEFAULT_RECALL_K: tuple[int, ...] = (1, 5, 10)
# Class names per `Model.text_classifier` call: one progress step, and a bounded number of prompts in memory.
CLASSES_PER_STEP = 50


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. `templates` / `classnames` are files overriding the dataset's or the packaged prompts;
    `train_dataset` is the linear probe's training set (default: the `train_split` of `dataset`)."""

    dataset: str
    task: str
    language: str = "en"
    templates: str | None = None
    classnames: str | None = None
    split: str = "test"
    train_dataset: str | None = None
    train_split: str = "train"
    recall_k: tuple[int, ...] = DEFAULT_RECALL_K
    batch_size: int = 64
    workers: int = 4
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the field for values no run could use."""
        if self.task not in TASKS:
            raise ValueError(f"task: unknown {self.task!r}; choose from {', '.join(TASKS)}")
        if not self.recall_k or any(k < 1 for k in self.recall_k):
            raise ValueError(f"recall_k: needs positive integers, got {list(self.recall_k)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers: must be at least 1, got {self.workers}")
        if not 0 <= self.probe.val_proportion < 1:
            raise ValueError(f"val_proportion: must be in [0, 1), got {self.probe.val_proportion}")
        if self.probe.epochs < 1 or self.probe.lr <= 0:
            raise ValueError("probe: epochs must be at least 1 and lr positive")


def _bar(config: EvalConfig, total: int, desc: str, unit: str) -> tqdm:
    # disable=None: bars only on a terminal, so logs and tests stay clean.
    return tqdm(total=total, desc=desc, unit=unit, disable=None if config.progress else True)


def encode_images(model: Model, images: Sequence[ImageRef], config: EvalConfig, desc: str = "images") -> torch.Tensor:
    """L2-normalised embeddings [N, D] of the referenced images, in order."""
    size = model.preprocessor.size

    def preprocess(batch: Sequence[ImageRef]) -> torch.Tensor:
        pixels = torch.empty((len(batch), 3, size, size), dtype=torch.float32)
        for i, ref in enumerate(batch):
            try:
                pixels[i] = model.preprocessor(open_image(read_image_source(ref)))
            except ImageError as exc:  # say which of the dataset's images it is
                raise ImageError(f"{ref}: {exc}") from None
        return pixels

    outputs: list[torch.Tensor] = []
    with ThreadPoolExecutor(config.workers) as pool, _bar(config, len(images), f"encoding {desc}", "image") as bar:
        pending: deque[Future[torch.Tensor]] = deque()

        def encode_oldest() -> None:
            outputs.append(model.encode_pixels(pending.popleft().result(), normalize=True))
            bar.update(len(outputs[-1]))

        for start in range(0, len(images), config.batch_size):
            pending.append(pool.submit(preprocess, images[start : start + config.batch_size]))
            if len(pending) > config.workers:  # keep `workers` batches decoding while the model encodes
                encode_oldest()
        while pending:
            encode_oldest()
    return torch.cat(outputs) if outputs else torch.empty(0, model.embed_dim)


def encode_texts(model: Model, texts: Sequence[str], config: EvalConfig) -> torch.Tensor:
    """L2-normalised embeddings [N, D] of the texts, in order."""
    outputs = []
    with _bar(config, len(texts), "encoding captions", "caption") as bar:
        for start in range(0, len(texts), config.batch_size):
            chunk = list(texts[start : start + config.batch_size])
            outputs.append(model.encode_tokens(model.tokenize(chunk), normalize=True))
            bar.update(len(chunk))
    return torch.cat(outputs) if outputs else torch.empty(0, model.embed_dim)


def zero_shot_prompts(dataset: ClassificationSet, config: EvalConfig) -> tuple[list[str], list[str]]:
    """(class names, templates) the way CLIP_benchmark picks them: a templates file wins, then the dataset's
    own templates, then the packaged ImageNet templates of `language` (its fallback for every dataset).
    ImageNet in another language uses the packaged translated class names unless a class-names file is given."""
    classnames = dataset.classnames
    if dataset.is_imagenet and config.language != "en" and config.classnames is None:
        classnames = prompts.imagenet_classnames(config.language)
    if config.templates is not None:
        templates = prompts.read_templates(config.templates)
    elif dataset.templates and not (dataset.is_imagenet and config.language != "en"):
        templates = dataset.templates
    else:
        templates = prompts.imagenet_templates(config.language)
    return classnames, templates


def build_classifier(model: Model, classnames: Sequence[str], templates: Sequence[str], config: EvalConfig) -> torch.Tensor:
    """Zero-shot class embeddings [C, D] from `Model.text_classifier`, a few classes per progress step."""
    parts = []
    with _bar(config, len(classnames), "zero-shot classifier", "class") as bar:
        for start in range(0, len(classnames), CLASSES_PER_STEP):
            chunk = classnames[start : start + CLASSES_PER_STEP]
            parts.append(model.text_classifier(chunk, templates))
            bar.update(len(chunk))
    return torch.cat(parts)


def _classification_set(dataset: EvalSet) -> ClassificationSet:
    if not isinstance(dataset, ClassificationSet):
        raise DatasetError(f"dataset {dataset.spec!r} has captions, not labels: use --task zeroshot_retrieval")
    return dataset


def run_zeroshot_classification(model: Model, dataset: ClassificationSet, config: EvalConfig) -> dict[str, float]:
    classnames, templates = zero_shot_prompts(dataset, config)
    classifier = build_classifier(model, classnames, templates, config)
    features = encode_images(model, dataset.images, config)
    logits = 100.0 * features @ classifier.T
    return classification_metrics(logits, torch.tensor(dataset.labels), len(classnames))


def run_zeroshot_retrieval(model: Model, dataset: RetrievalSet, config: EvalConfig) -> dict[str, float]:
    if max(config.recall_k) > len(dataset.images):
        raise ValueError(
            f"recall_k: {max(config.recall_k)} exceeds the {len(dataset.images)} images of {dataset.spec!r}; "
            "pass smaller values (--recall-k)"
        )
    texts = [caption for captions in dataset.captions for caption in captions]
    text_to_image = torch.tensor([i for i, captions in enumerate(dataset.captions) for _ in captions])
    image_features = encode_images(model, dataset.images, config)
    text_features = encode_texts(model, texts, config)
    return retrieval_metrics(image_features, text_features, text_to_image, config.recall_k)


def run_linear_probe(model: Model, test: ClassificationSet, config: EvalConfig, classnames: list[str] | None) -> dict[str, float]:
    if config.train_dataset is None and not has_splits(test.spec):
        raise DatasetError(
            f"linear_probe: {test.spec!r} has no named splits; pass the training images with --train-dataset SPEC"
        )
    train_spec = config.train_dataset or test.spec
    train = _classification_set(load_dataset(train_spec, config.train_split, classnames))
    if len(train.classnames) != len(test.classnames):
        raise DatasetError(
            f"linear_probe: training set {train_spec!r} has {len(train.classnames)} classes, "
            f"test set {test.spec!r} has {len(test.classnames)}"
        )
    train_features = encode_images(model, train.images, config, "training images")
    test_features = encode_images(model, test.images, config, "test images")
    return linear_probe(
        train_features,
        torch.tensor(train.labels),
        test_features,
        torch.tensor(test.labels),
        len(test.classnames),
        config.probe,
        config.progress,
    )


def evaluate(model: Model, config: EvalConfig) -> dict[str, float]:
    """Metrics of `config.task` on `config.dataset`, named as CLIP_benchmark names them."""
    config.validate()
    classnames = prompts.read_classnames(config.classnames) if config.classnames else None
    dataset = load_dataset(config.dataset, config.split, classnames)
    if config.task == "zeroshot_retrieval":
        if not isinstance(dataset, RetrievalSet):
            raise DatasetError(f"dataset {dataset.spec!r} has labels, not captions: use a classification task")
        return run_zeroshot_retrieval(model, dataset, config)
    dataset = _classification_set(dataset)
    if config.task == "zeroshot_classification":
        return run_zeroshot_classification(model, dataset, config)
    return run_linear_probe(model, dataset, config, classnames)
