"""Known architectures and pretrained tags, as data.

Architectures are open_clip `model_cfg` dicts (the same JSON open_clip ships), validated into
`ModelConfig` on lookup. Pretrained tags map `ARCH/TAG` names to Hugging Face Hub repositories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipserve.config import ModelConfig, model_config_from_open_clip

_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": _CLIP_TEXT,
    },
    "ViT-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": _CLIP_TEXT,
    },
    "ViT-bigG-14": {
        "embed_dim": 1280,
        "vision_cfg": {
            "image_size": 224,
            "layers": 48,
            "width": 1664,
            "head_width": 104,
            "mlp_ratio": 4.9231,
            "patch_size": 14,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32},
    },
    "xlm-roberta-base-ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {
            "hf_model_name": "xlm-roberta-base",
            "hf_tokenizer_name": "xlm-roberta-base",
            "hf_pooler_type": "mean_pooler",
        },
    },
}


@dataclass(frozen=True)
class Pretrained:
    architecture: str
    tag: str
    hf_repo: str
    description: str

    @property
    def name(self) -> str:
        return f"{self.architecture}/{self.tag}"


PRETRAINED: dict[str, Pretrained] = {
    p.name: p
    for p in (
        Pretrained(
            "ViT-B-32",
            "datacomp_xl_s13b_b90k",
            "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
            "ViT-B/32 trained on DataComp-1B (ImageNet zero-shot 69.2%)",
        ),
        Pretrained(
            "ViT-B-16",
            "laion2b_s34b_b88k",
            "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
            "ViT-B/16 trained on LAION-2B (ImageNet zero-shot 70.2%)",
        ),
        Pretrained(
            "ViT-bigG-14",
            "laion2b_s39b_b160k",
            "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
            "ViT-bigG/14 trained on LAION-2B (ImageNet zero-shot 80.1%)",
        ),
        Pretrained(
            "xlm-roberta-base-ViT-B-32",
            "laion5b_s13b_b90k",
            "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
            "multilingual ViT-B/32 + XLM-R base trained on LAION-5B (ImageNet zero-shot 62.3%)",
        ),
    )
}

DEFAULT_MODEL = "ViT-B-32/datacomp_xl_s13b_b90k"


class UnknownModelError(LookupError):
    """A model name that is neither an architecture, a pretrained tag nor a path."""


def architecture(name: str) -> ModelConfig:
    """The validated config of a known architecture."""
    try:
        cfg = ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return model_config_from_open_clip(cfg, f"architecture {name}")


def pretrained(name: str) -> Pretrained:
    """Look up `ARCH/TAG` (also accepted: `ARCH:TAG`)."""
    key = name.replace(":", "/", 1) if ":" in name and not name.startswith("hf-hub:") else name
    try:
        return PRETRAINED[key]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; pretrained names: {', '.join(sorted(PRETRAINED))}; "
            "or pass hf-hub:ORG/REPO, a local directory, or an architecture with a checkpoint"
        ) from None


def pretrained_for_repo(repo_id: str) -> Pretrained | None:
    for p in PRETRAINED.values():
        if p.hf_repo.lower() == repo_id.lower():
            return p
    return None
