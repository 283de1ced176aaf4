"""`clipserve.load`: from a name, repository or path to a ready `Model`."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from clipserve import registry
from clipserve.config import (
    ConfigError,
    ModelConfig,
    PreprocessConfig,
    XLMRobertaConfig,
    model_config_from_open_clip,
    preprocess_config_from_open_clip,
)
from clipserve.engine import linears, quantize
from clipserve.engine.fast import retain_freed_memory
from clipserve.engine.linears import pack_fp32_linears
from clipserve.engine.model import PRECISIONS, Model
from clipserve.engine.quantize import INT8, int8_rows_available, quantize_int8
from clipserve.io import checkpoints, hub
from clipserve.io.checkpoints import CheckpointError, StateDict
from clipserve.io.tokenizers import CLIPTokenizer, Tokenizer, XLMRobertaTokenizer
from clipserve.models.clip import CLIP

TOKENIZER_FILE = "tokenizer.json"
AUTO = "auto"
PRECISION_CHOICES = (AUTO, *PRECISIONS, INT8)


@dataclass
class ResolvedCheckpoint:
    """Everything `load` needs, gathered from wherever the source points."""

    name: str
    architecture: str
    source: str
    model_cfg: ModelConfig
    preprocess_cfg: PreprocessConfig
    state: StateDict
    tokenizer_file: Path | None = None


def _looks_hf(state: StateDict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def _bare_state(path: Path) -> StateDict:
    state = checkpoints.read_state_dict(path)
    return checkpoints.from_hf(state) if _looks_hf(state) else checkpoints.from_open_clip(state)


def _architecture_name(cfg: ModelConfig) -> str:
    for name in registry.ARCHITECTURES:
        if registry.architecture(name) == cfg:
            return name
    v = cfg.vision
    return f"ViT-{v.width}w{v.layers}L-{v.patch_size}" + ("-xlmr" if cfg.text_kind == "xlm-roberta" else "")


def _resolve_directory(directory: Path) -> ResolvedCheckpoint:
    model_cfg, pre_cfg, state = checkpoints.read_directory(directory)
    tokenizer = directory / TOKENIZER_FILE
    return ResolvedCheckpoint(
        name=directory.name,
        architecture=_architecture_name(model_cfg),
        source=str(directory),
        model_cfg=model_cfg,
        preprocess_cfg=pre_cfg,
        state=state,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
    )


def _resolve_hub(repo: hub.HubRepo, known: registry.Pretrained | None, name: str) -> ResolvedCheckpoint:
    if known is not None:
        # open_clip builds pretrained tags from its own configs; the xlm-roberta repo has no config file.
        model_cfg = registry.architecture(known.architecture)
        pre_cfg = PreprocessConfig(size=model_cfg.image_size)
    else:
        config_path = hub.fetch(repo.repo_id, checkpoints.OPEN_CLIP_CONFIG, revision=repo.revision, required=False)
        if config_path is None:
            hf_config = hub.fetch(repo.repo_id, checkpoints.HF_CONFIG, revision=repo.revision, required=False)
            if hf_config is None:
                raise hub.HubError(
                    f"{repo.repo_id} has neither {checkpoints.OPEN_CLIP_CONFIG} nor {checkpoints.HF_CONFIG}"
                )
            return _resolve_directory(hub_snapshot_hf(repo, hf_config))
        data = json.loads(config_path.read_text(encoding="utf-8"))
        if "model_cfg" not in data:
            raise ConfigError(str(config_path), "model_cfg", "missing")
        model_cfg = model_config_from_open_clip(data["model_cfg"], f"{repo.repo_id}/{checkpoints.OPEN_CLIP_CONFIG}")
        pre_cfg = preprocess_config_from_open_clip(
            data.get("preprocess_cfg"), model_cfg.image_size, f"{repo.repo_id}/{checkpoints.OPEN_CLIP_CONFIG}"
        )
    weights = hub.fetch_first(
        repo.repo_id, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), revision=repo.revision
    )
    tokenizer_file = None
    if isinstance(model_cfg.text, XLMRobertaConfig):
        tokenizer_file = hub.fetch(repo.repo_id, TOKENIZER_FILE, revision=repo.revision)
    return ResolvedCheckpoint(
        name=name,
        architecture=known.architecture if known else _architecture_name(model_cfg),
        source=f"hf-hub:{repo.repo_id}",
        model_cfg=model_cfg,
        preprocess_cfg=pre_cfg,
        state=checkpoints.from_open_clip(checkpoints.read_state_dict(weights)),
        tokenizer_file=tokenizer_file,
    )


def hub_snapshot_hf(repo: hub.HubRepo, config_path: Path) -> Path:
    """Fetch a transformers-layout repository's weight files next to its config; return the directory."""
    index = hub.fetch(repo.repo_id, "model.safetensors.index.json", revision=repo.revision, required=False)
    index = index or hub.fetch(repo.repo_id, "pytorch_model.bin.index.json", revision=repo.revision, required=False)
    if index is not None:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        for shard in sorted(shards):
            hub.fetch(repo.repo_id, shard, revision=repo.revision)
    else:
        hub.fetch_first(repo.repo_id, checkpoints.HF_WEIGHTS, revision=repo.revision)
    hub.fetch(repo.repo_id, "preprocessor_config.json", revision=repo.revision, required=False)
    return config_path.parent


def resolve(source: str, checkpoint: str | Path | None = None) -> ResolvedCheckpoint:
    """Find config, preprocessing, weights and tokenizer for any source `load` accepts."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            return _resolve_directory(path)
        arch = source.split("/", 1)[0] if source in registry.PRETRAINED else source
        model_cfg = registry.architecture(arch)
        tokenizer = path.parent / TOKENIZER_FILE
        return ResolvedCheckpoint(
            name=f"{arch}/{path.stem}",
            architecture=arch,
            source=str(path),
            model_cfg=model_cfg,
            preprocess_cfg=PreprocessConfig(size=model_cfg.image_size),
            state=_bare_state(path),
            tokenizer_file=tokenizer if tokenizer.is_file() else None,
        )
    if source.startswith(hub.HF_HUB_PREFIX):
        repo = hub.HubRepo.parse(source)
        return _resolve_hub(repo, registry.pretrained_for_repo(repo.repo_id), source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_directory(path)
    if path.is_file():
        raise CheckpointError(
            f"{path} is a weights file: pass the architecture with it, e.g. load('ViT-B-32', checkpoint='{path}')"
        )
    if source in registry.ARCHITECTURES:
        raise registry.UnknownModelError(
            f"{source!r} is an architecture without weights: pass a pretrained name "
            f"({', '.join(p for p in registry.PRETRAINED if p.startswith(source + '/')) or 'none known'}) "
            "or checkpoint=PATH"
        )
    if source.count("/") == 1 and source.split("/", 1)[0] not in registry.ARCHITECTURES:
        raise registry.UnknownModelError(
            f"{source!r} is neither a local path nor a pretrained name; for a Hub repository write hf-hub:{source}"
        )
    known = registry.pretrained(source)
    return _resolve_hub(hub.HubRepo(known.hf_repo), known, known.name)


def build_tokenizer(resolved: ResolvedCheckpoint) -> Tokenizer:
    text = resolved.model_cfg.text
    if isinstance(text, XLMRobertaConfig):
        if resolved.tokenizer_file is None:
            raise CheckpointError(
                f"{resolved.source}: the XLM-RoBERTa text tower needs {TOKENIZER_FILE} next to the weights"
            )
        return XLMRobertaTokenizer.from_file(resolved.tokenizer_file, context_length=text.context_length)
    return CLIPTokenizer(context_length=text.context_length)


def build_module(model_cfg: ModelConfig, state: StateDict, source: str, dtype: torch.dtype) -> CLIP:
    """Instantiate on the meta device and adopt the checkpoint's tensors (no second copy of the weights)."""
    with torch.device("meta"):
        module = CLIP(model_cfg)
    checkpoints.check_keys(module.state_dict(), state, source)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU")
    return device


BACKENDS = ("torch", "onnx")


def _build_runtime(
    resolved: ResolvedCheckpoint, device: str, precision: str, backend: str, compile: bool = False
) -> torch.nn.Module:
    """The module `Model` runs: torch weights cast once or int8-quantised, or ONNX Runtime sessions."""
    if backend == "onnx":
        from clipserve.engine import onnx_backend

        if device != "cpu" or precision not in onnx_backend.ONNX_PRECISIONS:
            raise ValueError(
                f"backend='onnx' runs on cpu with precision {' or '.join(onnx_backend.ONNX_PRECISIONS)}, "
                f"not {device}/{precision}"
            )
        directory = onnx_backend.ensure_exported(
            resolved.state,
            lambda: build_module(resolved.model_cfg, resolved.state, resolved.source, torch.float32),
            precision,
        )
        logit_scale = resolved.state.get("logit_scale", torch.tensor(0.0))
        return onnx_backend.OnnxCLIP(directory, resolved.model_cfg, logit_scale, precision=precision)
    dtype = torch.float32 if precision == INT8 else PRECISIONS[precision]  # int8 quantises fp32 weights
    module = build_module(resolved.model_cfg, resolved.state, resolved.source, dtype).to(device)
    if precision == INT8:
        bf16_products = bf16_attention_products(compile)
        module = quantize_int8(module, bf16_products=bf16_products, pixels=resolved.preprocess_cfg)
    elif precision == "fp32":
        module = pack_fp32_linears(module)
    return compile_towers(module) if compile else module


# CPU flags of an int8 dot-product instruction. With one, int8 GEMM runs 3-4.5x fp32 and int8 is the default
# (a 2-core AVX-512 VNNI Xeon, bench/encode.py: oneDNN int8 GEMM 602 against fp32 184 GFLOP/s; ViT-B/32 batch 32
# int8 25.9 against fp32 16.8 images/s, cosine 0.9997); without, int8 gains too little for its approximation
# (a 2-core AVX2 EPYC: ViT-B/32 batch 32 int8 18.2 against fp32 14.9 images/s).
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# CPU flags of a bf16 dot-product instruction: int8 with `compile=True` then runs attention's second product in
# bf16 (`BF16Attention`). Eager, its separate passes (scale, softmax, casts, copies) cost more than the bf16
# product saves. bench/int8_ablation.py, ViT-B/32 batch 32 on a 2-core AVX-512 BF16 EPYC, four runs
# (int8-ablation-vm-20261202-073444, 073535, 085219, 085332), against torch's flash attention: eager -3.8%,
# +0.7%, -3.2%, -3.8%; compiled +3.9%, +1.5%, -0.7%, +3.4%.
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def bf16_attention_products(compile: bool) -> bool:
    """Whether int8 runs attention's second product in bf16 (`BF16Attention`): compiled, on bf16 CPUs."""
    return compile and bool(cpu_flags() & BF16_DOT_FLAGS)


def resolve_precision(precision: str, device: str) -> str:
    """precision="auto": the fastest path measured to keep cosine >= 0.995 to fp32 on this kind of device."""
    if precision != AUTO:
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return INT8 if cpu_flags() & INT8_DOT_FLAGS else "fp32"


class BatchDynamicTower(torch.nn.Module):
    """A compiled tower whose input varies only in its batch dimension (images at the model's resolution).

    `dynamic=True` would make every input dimension symbolic, the image size too, so that inductor tiles the
    kernels around a symbolic sequence length; in a side-by-side timing (not a bench row) that ran slower
    than marking the batch alone, which ran as fast as fully static shapes. Batch 1 still compiles its own
    graph (torch specialises sizes 0 and 1). Other attributes resolve on the eager tower.
    """

    def __init__(self, tower: torch.nn.Module, mode: str | None) -> None:
        super().__init__()
        self.compiled = torch.compile(tower, dynamic=None, mode=mode)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled() and not pixels.is_inference():
            # Callers' tensors and tensors made in inference mode fail each other's guards: one kind, one set
            # of graphs (torch caps the graphs per code object, which every model in the process shares).
            pixels = pixels.clone()
        torch._dynamo.maybe_mark_dynamic(pixels, 0)
        return self.compiled(pixels)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.compiled, name)


@functools.cache
def custom_ops_digest() -> str:
    """A digest of the sources that define clipserve's custom ops (`clipserve::int8_gemm`, ...)."""
    digest = hashlib.sha256()
    for module in (linears, quantize):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_cache() -> None:
    """Key torch.compile's on-disk caches (process-wide) to this version of clipserve's custom ops.

    A cached graph keeps what an op's fake kernel said of its output (shape, strides), and inductor's cache key
    covers the op's name, not its Python source: after a clipserve change to a fake kernel, the old graph would
    load and fail its stride checks on the first call (seen while changing `bf16_attention`'s). A user's own
    `torch.compiler.config.cache_key_tag` is kept, with this tag appended.
    """
    tag = f"clipserve-ops-{custom_ops_digest()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag


# Graphs dynamo may keep per code object. Every model's towers share their classes' `forward` code, and each
# compiled model adds up to four image graphs (batch 1 and more, normalised floats and decoded pixels) per
# architecture and precision: at torch's default of 8 the second or third compiled model in a process ran
# eagerly (seen in bench/encode.py, which loads several).
RECOMPILE_LIMIT = 64


def compile_towers(module: CLIP) -> CLIP:
    """`torch.compile` both towers in place: images with a dynamic batch, texts with dynamic batch and length.

    On a GPU with CUDA graphs ("reduce-overhead": a graph per batch shape, which removes the kernel launch
    cost that bounds small batches); on CPU in inductor's default mode, which fuses the elementwise work
    between GEMMs (int8: the per-row quantisation into the LayerNorm or GELU before it). Off by default, as it
    compiles for a minute or more at load (`Model.warm_up`). See the README for what it gains.
    """
    tag_compile_cache()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    mode = "reduce-overhead" if next(module.parameters()).device.type == "cuda" else None
    module.visual = BatchDynamicTower(module.visual, mode)
    # The text towers trim each batch to its longest row first, reading a value: that stays eager.
    module.text.encode_trimmed = torch.compile(module.text.encode_trimmed, dynamic=True, mode=mode)
    return module


def load(
    source: str,
    *,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    precision: str = AUTO,
    backend: str = "torch",
    batch_size: int = 64,
    compile: bool = False,
) -> Model:
    """Load a CLIP model.

    `source`: a pretrained name (`ViT-B-32/datacomp_xl_s13b_b90k`), `hf-hub:ORG/REPO`, a local directory in
    open_clip or Hugging Face layout, or an architecture name together with `checkpoint=PATH`.
    `precision`: fp32 (exact; on CPU through oneDNN packed weights), bf16 or fp16 (weights cast once;
    LayerNorm statistics stay in fp32), int8 (int8 GEMMs, activations quantised per row; CPU only), or auto:
    bf16 on a GPU (fp16 where it has no bf16), int8 on CPUs with int8 dot-product instructions (VNNI, AMX),
    fp32 on other CPUs. `model.info.precision` says which was chosen.
    `backend`: torch, or onnx (ONNX Runtime on a cached export, CPU, fp32 or int8; needs `clipserve[onnx]`).
    `compile`: `torch.compile` the towers (CUDA graphs on a GPU; see `compile_towers`), torch backend only;
    they compile here, before `load` returns (a minute or two for a ViT-B on a 2-core CPU, less from the
    on-disk cache of an earlier run).
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISION_CHOICES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if compile and backend != "torch":
        raise ValueError(f"compile=True needs backend='torch', not {backend!r}")
    if compile and precision == INT8 and not int8_rows_available():
        raise ValueError("compile=True with precision='int8' needs oneDNN's int8 Linear, which this torch lacks")
    if torch.device(device).type == "cpu":
        retain_freed_memory()
    resolved = resolve(str(source), checkpoint)
    parameters = sum(t.numel() for t in resolved.state.values())
    module = _build_runtime(resolved, device, precision, backend, compile)
    model = Model(
        module,
        build_tokenizer(resolved),
        resolved.preprocess_cfg,
        name=resolved.name,
        architecture=resolved.architecture,
        source=resolved.source,
        device=device,
        precision=precision,
        batch_size=batch_size,
        parameters=parameters,
        backend=backend,
    )
    if compile:
        model.warm_up()
    return model
