"""backend="onnx": both towers exported to ONNX once, then run by ONNX Runtime.

Export uses torch's legacy TorchScript exporter (`dynamo=False`) with `dynamic_axes`: the new exporter fixes the
batch axis to the example's size unless it is declared dynamic, and the legacy one is what ONNX Runtime's
fusions (attention, GELU, LayerNorm) are tuned for. The text graph takes ids already trimmed to the longest
row (`token_lengths`), because the trim is data-dependent Python and a traced graph would freeze it; its
length axis is dynamic.

Exports are cached under `cache_root()/<key>/`, the key being a hash of the checkpoint's tensors, so a model
is exported once per weights, wherever they came from. precision="int8" adds ONNX Runtime's dynamic int8
quantisation of the MatMul weights (`onnxruntime.quantization.quantize_dynamic`).

onnx and onnxruntime are optional dependencies (`pip install clipserve[onnx]`), imported only here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipserve.config import ModelConfig, XLMRobertaConfig
from clipserve.io.checkpoints import StateDict
from clipserve.models.clip import CLIP

IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
META_FILE = "clipserve-onnx.json"
OPSET = 17
ONNX_PRECISIONS = ("fp32", "int8")
EXPORT_FORMAT = 1  # bump when the graphs' inputs/outputs change, so stale caches are not reused


class OnnxUnavailableError(RuntimeError):
    pass


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise OnnxUnavailableError(
            "backend='onnx' needs onnxruntime: pip install 'clipserve[onnx]'"
        ) from None
    return onnxruntime


def cache_root() -> Path:
    base = os.environ.get("CLIPSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clipserve"
    )
    return Path(base) / "onnx"


def checkpoint_key(state: StateDict) -> str:
    """A content hash of the weights (names, dtypes, shapes, bytes): ~1 s for 600 MB, cheaper than an export."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(EXPORT_FORMAT).encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class _ImageGraph(nn.Module):
    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class _TextGraph(nn.Module):
    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.text = clip.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.encode_trimmed(tokens)


def _example_tokens(clip: CLIP) -> torch.Tensor:
    """Two rows of 8 ids ending in each tokenizer's end token (not the largest length, so nothing is fixed)."""
    cfg = clip.cfg.text
    if isinstance(cfg, XLMRobertaConfig):
        return torch.tensor([[0, 10, 11, 12, 13, 14, 15, 2], [0, 20, 21, 2, 1, 1, 1, 1]])
    return torch.tensor([[49406, 10, 11, 12, 13, 14, 15, 49407], [49406, 20, 21, 49407, 0, 0, 0, 0]])


def export(clip: CLIP, directory: str | Path, *, precision: str = "fp32") -> Path:
    """Write `image.onnx` and `text.onnx` (fp32 graphs, dynamic batch and text length) for a float32 CLIP;
    with precision="int8" also their dynamically quantised twins `image.int8.onnx`, `text.int8.onnx`."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"ONNX export supports precision {' or '.join(ONNX_PRECISIONS)}, not {precision!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip = clip.float().eval().cpu()
    size = clip.cfg.image_size
    with torch.no_grad():
        torch.onnx.export(
            _ImageGraph(clip),
            (torch.zeros(2, 3, size, size),),
            str(directory / IMAGE_GRAPH),
            input_names=["pixels"],
            output_names=["embeddings"],
            dynamic_axes={"pixels": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        torch.onnx.export(
            _TextGraph(clip),
            (_example_tokens(clip),),
            str(directory / TEXT_GRAPH),
            input_names=["tokens"],
            output_names=["embeddings"],
            dynamic_axes={"tokens": {0: "batch", 1: "length"}, "embeddings": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    if precision == "int8":
        quantize_graphs(directory)
    meta = {"format": EXPORT_FORMAT, "parameters": sum(p.numel() for p in clip.parameters())}
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def graph_path(directory: Path, graph: str, precision: str) -> Path:
    return directory / (graph if precision == "fp32" else graph.replace(".onnx", f".{precision}.onnx"))


def quantize_graphs(directory: Path) -> None:
    """ONNX Runtime dynamic int8: int8 weights per channel, uint8 activations quantised per call.

    Per-channel signed weights keep cosine >= 0.999 to fp32 on ViT-B/32 (bench/encode.py); `reduce_range`
    (7-bit weights) avoids the int16 saturation of the u8 x s8 AVX2 kernels on CPUs without VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for graph in (IMAGE_GRAPH, TEXT_GRAPH):
        quantize_dynamic(
            str(directory / graph),
            str(graph_path(directory, graph, "int8")),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )


def ensure_exported(state: StateDict, build: Callable[[], CLIP], precision: str) -> Path:
    """The cached export directory for these weights; `build()` (a float32 CLIP) is called only to export."""
    directory = cache_root() / checkpoint_key(state)
    image, text = graph_path(directory, IMAGE_GRAPH, precision), graph_path(directory, TEXT_GRAPH, precision)
    if image.is_file() and text.is_file() and (directory / META_FILE).is_file():
        return directory
    if (directory / META_FILE).is_file():
        quantize_graphs(directory)  # fp32 graphs are there, the int8 ones are not
    else:
        export(build(), directory, precision=precision)
    return directory


def session_options(threads: int, *, spinning: bool = True) -> Any:
    """Sequential execution on `threads` intra-op threads with every graph optimisation.

    `spinning=False` stops idle ORT workers from busy-waiting: on a small machine where decode workers share
    the cores with inference, spinning threads would steal their time.
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxCLIP(nn.Module):
    """ONNX Runtime sessions behind CLIP's `encode_image` / `encode_text` interface (what `Model` calls).

    Holds no torch weights: only the config, `logit_scale` and a meta-device text tower for `token_lengths`.
    """

    def __init__(
        self,
        directory: Path,
        model_cfg: ModelConfig,
        logit_scale: torch.Tensor,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        spinning: bool = True,
    ) -> None:
        super().__init__()
        ort = _onnxruntime()
        self.cfg = model_cfg
        self.precision = precision
        self.logit_scale = nn.Parameter(logit_scale.detach().float().reshape(()), requires_grad=False)
        meta = json.loads((directory / META_FILE).read_text())
        self.parameter_count = int(meta["parameters"])
        with torch.device("meta"):
            self.token_lengths = CLIP(model_cfg).text.token_lengths  # pure index arithmetic, no weights used
        options = session_options(threads or torch.get_num_threads(), spinning=spinning)
        providers = ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(
            str(graph_path(directory, IMAGE_GRAPH, precision)), options, providers=providers
        )
        self.text_session = ort.InferenceSession(
            str(graph_path(directory, TEXT_GRAPH, precision)), options, providers=providers
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.image_session.run(None, {"pixels": array})
        features = torch.from_numpy(out)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = tokens.detach().cpu()
        length = max(int(self.token_lengths(tokens).max()), 1)
        array = np.ascontiguousarray(tokens[:, :length].numpy(), dtype=np.int64)
        (out,) = self.text_session.run(None, {"tokens": array})
        features = torch.from_numpy(out)
        return nn.functional.normalize(features, dim=-1) if normalize else features
