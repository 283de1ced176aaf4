"""Model and preprocessing configs: plain dataclasses, validated once where they enter.

The field names follow open_clip's `model_cfg` JSON (`vision_cfg`, `text_cfg`) so that an
`open_clip_config.json` maps onto them one to one. Anything open_clip can express that this runtime does
not implement is refused by name (file and field) rather than silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config file or dict that does not describe a model this runtime can build."""

    def __init__(self, source: str, field_path: str, problem: str) -> None:
        super().__init__(f"{source}: {field_path}: {problem}")
        self.source = source
        self.field_path = field_path


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower (open_clip `CLIPVisionCfg` subset)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        # open_clip: int(d_model * mlp_ratio); bigG's 4.9231 gives int(8192.0384) = 8192.
        return int(self.width * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """CLIP causal text transformer (open_clip `CLIPTextCfg` subset)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class XLMRobertaConfig:
    """XLM-RoBERTa text encoder with masked mean pooling and an MLP projection (open_clip HFTextEncoder).

    The defaults are `xlm-roberta-base`'s published config, so no hub fetch is needed to build it.
    """

    hf_model_name: str = "xlm-roberta-base"
    vocab_size: int = 250002
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    context_length: int = 77  # tokenizer length, not max_position_embeddings


HF_TEXT_MODELS: dict[str, XLMRobertaConfig] = {
    "xlm-roberta-base": XLMRobertaConfig(),
    "xlm-roberta-large": XLMRobertaConfig(
        hf_model_name="xlm-roberta-large", width=1024, layers=24, heads=16, mlp_width=4096
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig | XLMRobertaConfig
    quick_gelu: bool = False

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def text_kind(self) -> str:
        return "xlm-roberta" if isinstance(self.text, XLMRobertaConfig) else "clip"

    def to_open_clip(self) -> dict[str, Any]:
        """The `model_cfg` dict open_clip writes for this architecture."""
        vision = {k: v for k, v in asdict(self.vision).items()}
        cfg: dict[str, Any] = {"embed_dim": self.embed_dim, "vision_cfg": vision}
        if isinstance(self.text, XLMRobertaConfig):
            cfg["text_cfg"] = {
                "hf_model_name": self.text.hf_model_name,
                "hf_tokenizer_name": self.text.hf_model_name,
                "hf_pooler_type": "mean_pooler",
            }
        else:
            cfg["text_cfg"] = asdict(self.text)
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        return cfg


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_open_clip(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


# open_clip fields that are accepted when they hold the value this runtime implements.
_VISION_DEFAULTS_OK: dict[str, Any] = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "timm_model_name": None,
    "input_patchnorm": False,
    "global_average_pool": False,
}
_TEXT_DEFAULTS_OK: dict[str, Any] = {
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "act_kwargs": None,
    "norm_kwargs": None,
    "hf_model_pretrained": True,  # irrelevant: full checkpoints always carry the text weights
    "hf_proj_type": "mlp",
    "hf_pooler_type": "mean_pooler",
    "eos_id": 2,
}
_TOP_DEFAULTS_OK: dict[str, Any] = {
    "custom_text": True,
    "init_logit_bias": None,
    "cast_dtype": None,
}
_IGNORED_ALWAYS = {"hf_tokenizer_name", "tokenizer_kwargs", "hf_model_pretrained", "eos_id", "pad_id"}


def _check_known(source: str, prefix: str, data: Mapping[str, Any], known: set[str], ok: dict[str, Any]) -> None:
    for key, value in data.items():
        if key in known or key in _IGNORED_ALWAYS:
            continue
        if key in ok:
            if value != ok[key] and not (value is None and ok[key] in (False, 0.0)):
                raise ConfigError(
                    source, f"{prefix}{key}", f"value {value!r} is not supported (only {ok[key]!r})"
                )
            continue
        raise ConfigError(source, f"{prefix}{key}", "unknown or unsupported field")


def _typed(source: str, path: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(source, path, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind in (int, float) and value <= 0:
        raise ConfigError(source, path, f"must be positive, got {value!r}")
    return value


def _build(cls: type, source: str, prefix: str, data: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            kwargs[f.name] = _typed(source, prefix + f.name, data[f.name], kind)
    return cls(**kwargs)


def model_config_from_open_clip(model_cfg: Mapping[str, Any], source: str = "<model_cfg>") -> ModelConfig:
    """Validate an open_clip `model_cfg` dict and turn it into a `ModelConfig`.

    `source` names the file the dict came from, so that errors point at it.
    """
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(source, "model_cfg", "expected an object")
    if "embed_dim" not in model_cfg:
        raise ConfigError(source, "embed_dim", "missing")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg.get(key), Mapping):
            raise ConfigError(source, key, "missing or not an object")
    _check_known(source, "", model_cfg, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}, _TOP_DEFAULTS_OK)
    embed_dim = _typed(source, "embed_dim", model_cfg["embed_dim"], int)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))

    vcfg = dict(model_cfg["vision_cfg"])
    image_size = vcfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ConfigError(source, "vision_cfg.image_size", f"only square images are supported, got {image_size!r}")
        vcfg["image_size"] = image_size[0]
    if "layers" in vcfg and not isinstance(vcfg["layers"], int):
        raise ConfigError(source, "vision_cfg.layers", "ResNet (list of layers) towers are not supported")
    _check_known(source, "vision_cfg.", vcfg, {f.name for f in fields(VisionConfig)}, _VISION_DEFAULTS_OK)
    vision = _build(VisionConfig, source, "vision_cfg.", vcfg)
    if vision.width % vision.head_width:
        raise ConfigError(source, "vision_cfg.head_width", f"{vision.head_width} does not divide width {vision.width}")
    if vision.image_size % vision.patch_size:
        raise ConfigError(
            source, "vision_cfg.patch_size", f"{vision.patch_size} does not divide image_size {vision.image_size}"
        )

    tcfg = model_cfg["text_cfg"]
    text: TextConfig | XLMRobertaConfig
    if "hf_model_name" in tcfg:
        name = tcfg["hf_model_name"]
        if name not in HF_TEXT_MODELS:
            raise ConfigError(
                source, "text_cfg.hf_model_name", f"{name!r} is not supported (known: {sorted(HF_TEXT_MODELS)})"
            )
        _check_known(source, "text_cfg.", tcfg, {"hf_model_name", "context_length"}, _TEXT_DEFAULTS_OK)
        text = HF_TEXT_MODELS[name]
        if "context_length" in tcfg:
            text = XLMRobertaConfig(
                **{**asdict(text), "context_length": _typed(source, "text_cfg.context_length", tcfg["context_length"], int)}
            )
    else:
        _check_known(source, "text_cfg.", tcfg, {f.name for f in fields(TextConfig)}, _TEXT_DEFAULTS_OK)
        text = _build(TextConfig, source, "text_cfg.", tcfg)
        if text.width % text.heads:
            raise ConfigError(source, "text_cfg.heads", f"{text.heads} does not divide width {text.width}")
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu)


def preprocess_config_from_open_clip(
    cfg: Mapping[str, Any] | None, image_size: int, source: str = "<preprocess_cfg>"
) -> PreprocessConfig:
    cfg = dict(cfg or {})
    out = PreprocessConfig(size=image_size)
    kwargs: dict[str, Any] = {}
    for key in ("mean", "std"):
        if key in cfg:
            value = cfg[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                raise ConfigError(source, f"preprocess_cfg.{key}", f"expected 3 numbers, got {value!r}")
            kwargs[key] = tuple(float(v) for v in value)
    if "interpolation" in cfg:
        if cfg["interpolation"] not in ("bicubic", "bilinear"):
            raise ConfigError(source, "preprocess_cfg.interpolation", f"unsupported {cfg['interpolation']!r}")
        kwargs["interpolation"] = cfg["interpolation"]
    if "resize_mode" in cfg:
        if cfg["resize_mode"] not in ("shortest", "squash"):
            raise ConfigError(source, "preprocess_cfg.resize_mode", f"unsupported {cfg['resize_mode']!r}")
        kwargs["resize_mode"] = cfg["resize_mode"]
    if "size" in cfg:
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            size = size[0]
        kwargs["size"] = _typed(source, "preprocess_cfg.size", size, int)
    return PreprocessConfig(**{**asdict(out), **kwargs})


def read_open_clip_config(path: str | Path) -> tuple[ModelConfig, PreprocessConfig]:
    """Read an `open_clip_config.json` (`{"model_cfg": ..., "preprocess_cfg": ...}`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise ConfigError(str(path), "model_cfg", "missing")
    model = model_config_from_open_clip(data["model_cfg"], str(path))
    preprocess = preprocess_config_from_open_clip(data.get("preprocess_cfg"), model.image_size, str(path))
    return model, preprocess


def write_open_clip_config(path: str | Path, model: ModelConfig, preprocess: PreprocessConfig) -> None:
    payload = {"model_cfg": model.to_open_clip(), "preprocess_cfg": preprocess.to_open_clip()}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


__all__ = [
    "ConfigError",
    "ModelConfig",
    "PreprocessConfig",
    "TextConfig",
    "VisionConfig",
    "XLMRobertaConfig",
    "model_config_from_open_clip",
    "preprocess_config_from_open_clip",
    "read_open_clip_config",
    "write_open_clip_config",
]
