"""Swapping the Linear layers of a loaded CLIP for faster inference kernels.

More than 90% of a CLIP forward pass on CPU is Linear layers (ViT-B/32, batch 32: `aten::addmm` took 90% of
the profile). Two swaps use this module:
- precision="fp32" on CPU: oneDNN with weights reordered once into its blocked layout (`OneDNNLinear`).
  Same fp32 arithmetic in another summation order (max-abs difference ~1e-6 of unit-norm embeddings).
  Measured on a 2-core AVX2 EPYC against the same model on torch's MKL `addmm` (bench/encode.py, paths
  "clipserve fp32" and "clipserve fp32 torch-gemm"): ViT-B/32 11.4 against 7.8 images/s at batch 1, and
  14.7 against 14.4 at batch 32, where both kernels run near this CPU's GEMM rate.
- precision="int8" (quantize.py): dynamically quantised Linear layers.

CLIP's packed q/k/v projection is a bare parameter of `Attention`, not an `nn.Linear`; `ProjectedAttention`
turns it into one so that a swap covers a third of each block's GEMM work that it would otherwise miss.
The swapped modules are for inference: they hold no trainable parameters.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipserve.models.layers import Attention

log = logging.getLogger(__name__)

LinearFactory = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]


class ProjectedAttention(Attention):
    """`Attention` whose packed q/k/v projection is a module built by a `LinearFactory`.

    `Attention.__init__` is skipped on purpose: it would allocate the packed weights this replaces.
    """

    def __init__(self, attn: Attention, make_linear: LinearFactory) -> None:
        nn.Module.__init__(self)
        self.heads = attn.heads
        self.qkv = make_linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = make_linear(attn.out_proj.weight, attn.out_proj.bias)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


def swap_linears(module: nn.Module, make_linear: LinearFactory) -> nn.Module:
    """Replace, in place, every `nn.Linear` and every attention's q/k/v projection with `make_linear(w, b)`."""
    for name, child in list(module.named_children()):
        if type(child) is Attention:
            setattr(module, name, ProjectedAttention(child, make_linear))
        elif type(child) is nn.Linear:
            setattr(module, name, make_linear(child.weight, child.bias))
        else:
            swap_linears(child, make_linear)
    return module.eval()


@torch.library.custom_op("clipserve::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T + b through oneDNN's packed fp32 weights -> [M, N].

    A custom op so that torch.compile keeps it as one opaque call (inductor cannot lower oneDNN's packed
    Linear, and without it would run torch's default GEMM: on AMD CPUs MKL, at half oneDNN's rate) and
    compiles the elementwise work around it.
    """
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed_weight.shape[0]))


class OneDNNLinear(nn.Module):
    """y = x W^T + b in fp32 through oneDNN, with W reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        with torch.no_grad():
            # No batch-size hint: the layout chosen without one ran as fast at batch 1 and 32 as hinted ones.
            self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().float()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = onednn_linear(x.reshape(-1, self.in_features).contiguous(), self.packed_weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def kernel_error(make_linear: LinearFactory, kernel: str, fallback: str) -> float | None:
    """Max |make_linear(W, b)(x) - F.linear(x, W, b)| on a small fixed input (outputs ~4 in magnitude), or None,
    logged with what runs instead, where this torch build or CPU cannot run the kernel."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator)
    bias = torch.randn(24, generator=generator)
    x = torch.randn(2, 3, 16, generator=generator)
    try:
        with torch.inference_mode():
            return float((make_linear(weight, bias)(x) - F.linear(x, weight, bias)).abs().max())
    except (AttributeError, RuntimeError) as exc:  # op missing from this build or CPU unsupported
        log.info("%s unavailable (%s); %s", kernel, exc, fallback)
        return None


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's packed Linear, checked once against `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    error = kernel_error(OneDNNLinear, "oneDNN packed Linear", "fp32 runs on torch's default GEMM")
    return error is not None and error < 1e-3  # fp32 in another summation order


def pack_fp32_linears(module: nn.Module) -> nn.Module:
    """On CPU, run every Linear of a float32 module through oneDNN packed weights (where the build has them)."""
    if next(module.parameters()).device.type != "cpu" or not onednn_linear_available():
        return module
    return swap_linears(module, OneDNNLinear)
