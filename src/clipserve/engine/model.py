"""`Model`: a loaded CLIP with its tokenizer and preprocessing, the object every front end uses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipserve.config import ModelConfig, PreprocessConfig
from clipserve.engine.fast import ThreadPlan, encode_length_sorted, normalise_uint8
from clipserve.engine.pipeline import DecodePool
from clipserve.engine.quantize import takes_uint8_pixels
from clipserve.io.images import ImageInput, ImageLimits, Preprocessor
from clipserve.io.tokenizers import Tokenizer
from clipserve.models.clip import CLIP

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    parameters: int
    image_size: int
    context_length: int
    embed_dim: int
    precision: str
    device: str
    source: str
    backend: str = "torch"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_prompt(template: str, label: str) -> str:
    """Templates use `{}` or CLIP_benchmark's `{c}` for the label."""
    return template.replace("{c}", label) if "{c}" in template else template.format(label)


# (labels, templates): what a zero-shot classifier is computed from
ClassifierKey = tuple[tuple[str, ...], tuple[str, ...]]


class LabelCache:
    """A bounded, thread-safe LRU of zero-shot classifiers keyed by (labels, templates)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[ClassifierKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: ClassifierKey) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: ClassifierKey, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Model:
    """A CLIP model ready for inference. Build it with `clipserve.load`.

    Every `encode_*` call returns float32 CPU tensors, whatever the device and precision.
    """

    def __init__(
        self,
        module: CLIP,
        tokenizer: Tokenizer,
        preprocess_cfg: PreprocessConfig,
        *,
        name: str,
        architecture: str,
        source: str,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 64,
        parameters: int | None = None,
        backend: str = "torch",
    ) -> None:
        self.module = module.eval()
        self.config: ModelConfig = module.cfg
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg
        self.preprocessor = Preprocessor(preprocess_cfg)
        self.device = torch.device(device)
        self.precision = precision
        self.backend = backend
        self.batch_size = batch_size
        self.label_cache = LabelCache()
        self.uint8_pixels = takes_uint8_pixels(module)
        self.info = ModelInfo(
            name=name,
            architecture=architecture,
            # Quantised and ONNX modules hide their weights from parameters(): loading passes the count.
            parameters=parameters if parameters is not None else sum(p.numel() for p in module.parameters()),
            image_size=self.config.image_size,
            context_length=self.config.context_length,
            embed_dim=self.config.embed_dim,
            precision=precision,
            device=str(self.device),
            source=source,
            backend=backend,
        )

    # -- properties ------------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def logit_scale(self) -> float:
        """The learned temperature, as stored (use `exp()` of it to scale cosines)."""
        return float(self.module.logit_scale.detach().float())

    def __repr__(self) -> str:
        i = self.info
        return f"Model({i.name!r}, {i.architecture}, {i.parameters / 1e6:.1f}M params, {i.precision}, {i.device})"

    # -- inputs ----------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (LongTensor) for the model's tokenizer."""
        return self.tokenizer(texts)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (PIL, path or bytes) -> normalised float tensor [3, H, W], open_clip's eval transform."""
        return self.preprocessor.batch([image])[0]

    # -- encoders --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed images [N, 3, H, W] -> embeddings [N, D] (float32, CPU)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(
                f"expected a normalised float tensor [N, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
                " (decoded uint8 pixels [N, H, W, 3] go to encode_uint8)"
            )
        return self._encode_tower(pixels, normalize)

    def _encode_tower(self, pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} images, got {tuple(pixels.shape[-2:])}")
        outputs = [
            self.module.encode_image(chunk.to(self.device), normalize=normalize).float().cpu()
            for chunk in pixels.split(self.batch_size)
        ]
        return torch.cat(outputs) if outputs else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [N, L] -> embeddings [N, D] (float32, CPU).

        Rows are batched by length (each batch is trimmed to its longest row), results in input order.
        """
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids [N, L], got shape {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            return torch.empty(0, self.embed_dim)
        return encode_length_sorted(
            tokens,
            self.module.token_lengths(tokens),
            self.batch_size,
            lambda chunk: self.module.encode_text(chunk.to(self.device), normalize=normalize).float().cpu(),
        )

    def encode_image(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        normalize: bool = False,
        limits: ImageLimits | None = None,
        *,
        fast_decode: bool = False,
        decode_workers: int | None = None,
    ) -> torch.Tensor:
        """Images (PIL images, paths or bytes, or a preprocessed tensor [N,3,H,W]) -> [N, embed_dim].

        Images are decoded on `decode_workers` threads (0: in the calling thread; default `ThreadPlan`: on CPU
        all cores, between batches, so that decoding never takes a core from the model; with a GPU all cores
        but one, decoding the next batch while the GPU runs the current one); pixels go from the decoder into
        one uint8 batch buffer, which is moved to the model's device and normalised there with the exact
        preprocessing arithmetic. `fast_decode=True` decodes JPEGs at reduced size (`open_image(draft_size=...)`)
        and resizes with torch instead of Pillow, on the model's device when that is not the CPU: several times
        less CPU work per image, not bit-exact.
        """
        if isinstance(images, torch.Tensor):
            return self.encode_pixels(images, normalize)
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            images = [images]  # a single image
        if len(images) == 0:
            return torch.empty(0, self.embed_dim)
        plan = ThreadPlan.for_device(self.device.type)
        workers = plan.decode_workers if decode_workers is None else decode_workers
        # fast decode on an accelerator resizes there: the CPU only decodes
        resize_device = self.device if fast_decode and self.device.type != "cpu" else None
        with DecodePool(
            self.preprocessor,
            min(workers, len(images)),
            fast_decode=fast_decode,
            limits=limits,
            resize_device=resize_device,
            prefetch=plan.overlap,
        ) as pool:
            outputs = [self.encode_uint8(batch, normalize) for batch in pool.batches(images, self.batch_size)]
        return torch.cat(outputs)

    @torch.inference_mode()
    def encode_uint8(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Resized, cropped RGB pixels, uint8 [N, S, S, 3] (`DecodePool`'s batches) -> embeddings [N, D].

        The uint8 batch goes to the device (a quarter of float32's transfer) and is normalised there, with
        the exact preprocessing arithmetic; int8 towers take it as it is (`takes_uint8_pixels`: their patch
        embedding has the normalisation folded into its weights).
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected uint8 pixels [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device)
        if self.uint8_pixels:
            return self._encode_tower(images.permute(0, 3, 1, 2), normalize)
        cfg = self.preprocess_cfg
        return self._encode_tower(normalise_uint8(images, cfg.mean, cfg.std), normalize)

    def encode_text(self, texts: str | Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Texts -> [N, embed_dim]."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.empty(0, self.embed_dim)
        return self.encode_tokens(self.tokenize(list(texts)), normalize)

    def warm_up(self) -> None:
        """Run both towers once on each kind of input shape: with `compile=True`, this is when they compile
        (batch 1 and larger batches are separate graphs), so that no request waits for it."""
        size = self.config.image_size
        for batch in (1, 2):
            self.encode_pixels(torch.zeros(batch, 3, size, size))
            # decoded images: uint8 pixels (int8) or their normalised channels-last floats, other graphs
            self.encode_uint8(torch.zeros(batch, size, size, 3, dtype=torch.uint8))
            self.encode_text(["a photo of a dog.", "a cat"][:batch])

    # -- zero-shot -------------------------------------------------------------------------------------

    def text_classifier(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Zero-shot class embeddings [len(labels), D]: per label, normalise each prompt's embedding,
        average over templates, renormalise (open_clip / CLIP_benchmark). Cached per (labels, templates)."""
        key, prompts = self.classifier_prompts(labels, templates)
        cached = self.label_cache.get(key)
        if cached is None:
            cached = self.cache_classifier(key, self.encode_text(prompts, normalize=True))
        return cached

    def classifier_prompts(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> tuple[ClassifierKey, list[str]]:
        """The cache key of a label set and its prompts, label-major (`len(labels) * len(templates)`)."""
        labels = tuple(labels)
        templates = tuple(templates) if templates else DEFAULT_TEMPLATES
        if not labels:
            raise ValueError("at least one label is needed")
        return (labels, templates), [format_prompt(t, label) for label in labels for t in templates]

    def cache_classifier(self, key: ClassifierKey, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Class embeddings from the L2-normalised embeddings of `classifier_prompts(...)`, cached under `key`."""
        labels, templates = key
        embeddings = prompt_embeddings.view(len(labels), len(templates), -1)
        classifier = F.normalize(embeddings.mean(dim=1), dim=-1)
        self.label_cache.put(key, classifier)
        return classifier

    def classify(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        fast_decode: bool = False,
    ) -> torch.Tensor:
        """Zero-shot probabilities [N, len(labels)]: softmax over exp(logit_scale) * cosine."""
        classifier = self.text_classifier(labels, templates)
        features = self.encode_image(images, normalize=True, fast_decode=fast_decode)
        return (torch.exp(torch.tensor(self.logit_scale)) * features @ classifier.T).softmax(dim=-1)
