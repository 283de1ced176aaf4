"""precision="int8": dynamic int8 quantisation of every Linear layer of both towers.

Weights are quantised once (per tensor, symmetric) by `torch.ao` dynamic quantisation; activations are
quantised per batch at run time, so no calibration data is needed. `linears.swap_linears` covers CLIP's packed
q/k/v projection too, which `quantize_dynamic` alone would leave in fp32 (a third of each block's GEMM work).

The quantised-kernel engine is process-wide in torch (`torch.backends.quantized.engine`) and the packed
weights belong to the engine they were packed for. `quantized_engine()` picks the engine measured fastest
on the development CPU (see bench/encode.py and bench/results/); it is set once, before packing.
"""

from __future__ import annotations

import torch
from torch import nn

from clipserve.engine.linears import swap_linears

INT8 = "int8"
# Measured on an AVX2 EPYC (2 cores, ViT-B/32 batch 32, bench/encode.py): onednn's int8 GEMM ran 2-3x faster
# than fbgemm and "x86" (which dispatches to fbgemm for dynamic Linear). Falls back to what torch offers.
ENGINE_PREFERENCE = ("onednn", "x86", "fbgemm")


def quantized_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in ENGINE_PREFERENCE if engine in supported), supported[0])


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def quantize_int8(module: nn.Module) -> nn.Module:
    """Quantise, in place, every Linear layer (and CLIP's packed attention projection) of a float32 module.

    LayerNorms, embeddings, the patch convolution and the final projections stay in fp32 (a few percent of
    the FLOPs). CPU only: torch's dynamic int8 kernels have no CUDA implementation.
    """
    if next(module.parameters()).device.type != "cpu":
        raise ValueError("precision='int8' runs on CPU only (torch has no CUDA dynamic int8 kernels)")
    torch.backends.quantized.engine = quantized_engine()
    return swap_linears(module, int8_linear)
