"""Checkpoint files: reading, writing, and the two published key layouts.

Internal layout (what `clipserve.models.CLIP` holds): `visual.*`, `text.*`, `logit_scale`.
- open_clip layout: as internal, except that CLIP text towers keep their modules at the top level
  (`token_embedding.weight`, `transformer.resblocks.*`, ...). Files: `open_clip_config.json` +
  `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`.
- Hugging Face transformers `CLIPModel` layout: `config.json` + `model.safetensors` (or sharded
  `pytorch_model-*.bin` / `model-*.safetensors` with an index), with q/k/v split and projections transposed.

Safetensors files are memory-mapped (copy-on-write), so loading a 10 GB checkpoint costs page cache, not a
second copy; `.bin` files load with `weights_only=True` (and `mmap=True` when their format allows).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from clipserve.config import (
    ConfigError,
    ModelConfig,
    PreprocessConfig,
    TextConfig,
    VisionConfig,
    XLMRobertaConfig,
    read_open_clip_config,
    write_open_clip_config,
)

StateDict = dict[str, torch.Tensor]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Keys that published checkpoints carry but that hold no parameters (open_clip drops them too).
_IGNORED_SUFFIXES = ("position_ids", "attn_mask")

_CLIP_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture."""


# ----------------------------------------------------------------------------------------------------------
# Reading and writing tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> StateDict:
    """Memory-map a .safetensors file: tensors view the mapping, nothing is copied until written."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > 100 * 2**20:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(header_len))
            # ACCESS_COPY: writable private mapping, so tensors can be used as parameters (even trained)
            # without touching the file.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors: {exc}") from None
    start = 8 + header_len
    tensors: StateDict = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported header entry {info!r}") from None
        count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
        if mapped is None or start + end > len(mapped):
            raise CheckpointError(f"{path}: truncated file (tensor {name!r} runs past the end)")
        if count == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = flat.view(info["shape"])
    return tensors


def read_torch_bin(path: str | Path) -> StateDict:
    """A pickled state dict, loaded with weights_only=True (no arbitrary code from the file)."""
    path = Path(path)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # pickle.UnpicklingError for disallowed globals
        raise CheckpointError(f"{path}: refused to unpickle ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(data)


def read_state_dict(path: str | Path) -> StateDict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_bin(path)


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_safetensors(path: str | Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


# ----------------------------------------------------------------------------------------------------------
# open_clip layout <-> internal


def _is_clip_text_key(key: str) -> bool:
    return key.startswith(_CLIP_TEXT_TOP_LEVEL)


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Strip DDP prefixes and parameter-free keys, as open_clip's load_checkpoint does."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        out[key] = value
    if "logit_scale" in out and out["logit_scale"].ndim != 0:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def from_open_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    state = clean_state_dict(state)
    return {("text." + k if _is_clip_text_key(k) else k): v for k, v in state.items()}


def to_open_clip(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    if isinstance(cfg.text, XLMRobertaConfig):
        return dict(state)
    return {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel layout <-> internal

_HF_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_FIXED = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_HF_TOWERS = {"vision_model": "visual", "text_model": "text"}


def from_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIPModel keys -> internal keys (q/k/v concatenated, projections transposed)."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in clean_state_dict(state).items():
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t()
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.", 1)
            index, rest = rest.split(".", 1)
            prefix = f"{_HF_TOWERS.get(tower, tower)}.transformer.resblocks.{index}."
            module, param = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{param}", {})[module[-6]] = value
            elif module in _HF_LAYER:
                out[prefix + _HF_LAYER[module] + "." + param] = value
            else:
                out[key] = value  # reported as unexpected by the strict check
        else:
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"incomplete attention projections for {key}: found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    fixed = {v: k for k, v in _HF_FIXED.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    layer = {v: k for k, v in _HF_LAYER.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    out: StateDict = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif ".transformer.resblocks." in key:
            tower, rest = key.split(".transformer.resblocks.", 1)
            index, rest = rest.split(".", 1)
            prefix = f"{towers[tower]}.encoder.layers.{index}."
            module, param = rest.rsplit(".", 1)
            if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
                kind = param.rsplit("_", 1)[-1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                out[prefix + layer[module] + "." + param] = value
        else:
            raise CheckpointError(f"no Hugging Face CLIPModel name for key {key!r}")
    return out


def hf_config_to_model(config: Mapping[str, Any], source: str) -> ModelConfig:
    """Translate a transformers CLIPConfig dict (config.json) into a ModelConfig."""
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), Mapping):
            raise ConfigError(source, key, "missing: not a CLIPModel config.json")
    text, vision = config["text_config"], config["vision_config"]

    def get(section: Mapping[str, Any], name: str, path: str, default: Any = None) -> Any:
        value = section.get(name, default)
        if value is None:
            raise ConfigError(source, path, "missing")
        return value

    acts = {get(text, "hidden_act", "text_config.hidden_act", "quick_gelu"), get(vision, "hidden_act", "vision_config.hidden_act", "quick_gelu")}
    if not acts <= {"gelu", "quick_gelu"} or len(acts) != 1:
        raise ConfigError(source, "hidden_act", f"unsupported activation(s) {sorted(acts)} (need gelu or quick_gelu in both towers)")
    width = get(vision, "hidden_size", "vision_config.hidden_size", 768)
    heads = get(vision, "num_attention_heads", "vision_config.num_attention_heads", 12)
    hidden = get(vision, "intermediate_size", "vision_config.intermediate_size", 3072)
    ratio = hidden / width
    while int(width * ratio) < hidden:  # keep int(width * ratio) == intermediate_size exactly
        ratio = float(torch.nextafter(torch.tensor(ratio, dtype=torch.float64), torch.tensor(1e9, dtype=torch.float64)))
    vision_cfg = VisionConfig(
        image_size=get(vision, "image_size", "vision_config.image_size", 224),
        patch_size=get(vision, "patch_size", "vision_config.patch_size", 32),
        width=width,
        layers=get(vision, "num_hidden_layers", "vision_config.num_hidden_layers", 12),
        head_width=width // heads,
        mlp_ratio=ratio,
    )
    twidth = get(text, "hidden_size", "text_config.hidden_size", 512)
    text_cfg = TextConfig(
        context_length=get(text, "max_position_embeddings", "text_config.max_position_embeddings", 77),
        vocab_size=get(text, "vocab_size", "text_config.vocab_size", 49408),
        width=twidth,
        heads=get(text, "num_attention_heads", "text_config.num_attention_heads", 8),
        layers=get(text, "num_hidden_layers", "text_config.num_hidden_layers", 12),
        mlp_ratio=get(text, "intermediate_size", "text_config.intermediate_size", 2048) / twidth,
    )
    return ModelConfig(
        embed_dim=int(config.get("projection_dim", 512)),
        vision=vision_cfg,
        text=text_cfg,
        quick_gelu=acts == {"quick_gelu"},
    )


def model_to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if isinstance(cfg.text, XLMRobertaConfig):
        raise CheckpointError("the Hugging Face CLIPModel layout has no XLM-RoBERTa text tower; use --format open_clip")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_act": act,
            "hidden_size": cfg.text.width,
            "intermediate_size": cfg.text.mlp_width,
            "num_attention_heads": cfg.text.heads,
            "num_hidden_layers": cfg.text.layers,
            "max_position_embeddings": cfg.text.context_length,
            "vocab_size": cfg.text.vocab_size,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_act": act,
            "hidden_size": cfg.vision.width,
            "intermediate_size": cfg.vision.mlp_width,
            "num_attention_heads": cfg.vision.heads,
            "num_hidden_layers": cfg.vision.layers,
            "image_size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size,
            "num_channels": 3,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
        },
    }


def hf_preprocess_config(path: Path, image_size: int) -> PreprocessConfig:
    if not path.is_file():
        return PreprocessConfig(size=image_size)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    kwargs: dict[str, Any] = {"size": image_size}
    if "image_mean" in data:
        kwargs["mean"] = tuple(float(v) for v in data["image_mean"])
    if "image_std" in data:
        kwargs["std"] = tuple(float(v) for v in data["image_std"])
    if data.get("resample", 3) == 2:
        kwargs["interpolation"] = "bilinear"
    return PreprocessConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Directories


def find_first(directory: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def read_sharded(index_path: Path) -> StateDict:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from None
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_dict(index_path.parent / shard))
    return state


def directory_layout(directory: Path) -> str:
    """'open_clip' or 'hf' for a checkpoint directory."""
    if (directory / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    if (directory / HF_CONFIG).is_file():
        return "hf"
    raise CheckpointError(
        f"{directory}: neither {OPEN_CLIP_CONFIG} (open_clip layout) nor {HF_CONFIG} (Hugging Face layout) found"
    )


def read_directory(directory: str | Path) -> tuple[ModelConfig, PreprocessConfig, StateDict]:
    """Config, preprocessing and internal-layout state dict of a checkpoint directory in either layout."""
    directory = Path(directory)
    if directory_layout(directory) == "open_clip":
        model_cfg, pre_cfg = read_open_clip_config(directory / OPEN_CLIP_CONFIG)
        weights = find_first(directory, OPEN_CLIP_WEIGHTS + HF_WEIGHTS)
        if weights is None:
            raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(OPEN_CLIP_WEIGHTS)})")
        return model_cfg, pre_cfg, from_open_clip(read_state_dict(weights))
    config_path = directory / HF_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(config_path), f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    model_cfg = hf_config_to_model(config, str(config_path))
    pre_cfg = hf_preprocess_config(directory / "preprocessor_config.json", model_cfg.image_size)
    index = find_first(directory, HF_INDEXES)
    if index is not None:
        state = read_sharded(index)
    else:
        weights = find_first(directory, HF_WEIGHTS)
        if weights is None:
            raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(HF_WEIGHTS + HF_INDEXES)})")
        state = read_state_dict(weights)
    return model_cfg, pre_cfg, from_hf(state)


def write_directory(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    pre_cfg: PreprocessConfig,
    layout: str = "open_clip",
) -> Path:
    """Write an internal-layout state dict as a checkpoint directory (safetensors) in the given layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "open_clip":
        write_safetensors(directory / "open_clip_model.safetensors", to_open_clip(state, model_cfg))
        atomic_write(directory / OPEN_CLIP_CONFIG, lambda tmp: write_open_clip_config(tmp, model_cfg, pre_cfg))
    elif layout == "hf":
        config = model_to_hf_config(model_cfg)
        write_safetensors(directory / "model.safetensors", to_hf(state))
        preprocessor = {
            "crop_size": {"height": pre_cfg.size, "width": pre_cfg.size},
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "do_convert_rgb": True,
            "image_mean": list(pre_cfg.mean),
            "image_std": list(pre_cfg.std),
            "resample": 3 if pre_cfg.interpolation == "bicubic" else 2,
            "size": {"shortest_edge": pre_cfg.size},
            "image_processor_type": "CLIPImageProcessor",
        }
        for name, payload in ((HF_CONFIG, config), ("preprocessor_config.json", preprocessor)):
            text = json.dumps(payload, indent=2) + "\n"
            atomic_write(directory / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    else:
        raise ValueError(f"unknown layout {layout!r} (open_clip or hf)")
    return directory


def check_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with a readable report."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = "\n    ".join(items[:12])
        more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    raise CheckpointError(
        f"{source}: checkpoint does not match the architecture"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mismatched)
    )
