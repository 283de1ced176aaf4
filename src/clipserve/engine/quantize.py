"""precision="int8": every Linear layer of both towers on int8 GEMMs, activations quantised per row.

Weights are quantised once, symmetric, one scale per output channel. Activations are quantised at run time
with one scale per row (per token): `y = (q(x) @ q(W)^T) * row_scale * channel_scale + b`, the integer
product accumulated exactly in int32 by oneDNN (VNNI / AMX where the CPU has them). No calibration data.

Per-row rather than per-batch (what `torch.ao`'s dynamic quantisation and ONNX Runtime's do) because a
batch-wide scale makes an item's embedding depend on the other items of its batch: the server batches
concurrent requests, so the same image would embed differently from call to call, and a collection could not
find an item by its own image at score 1. Per row, an embedding is a function of its input alone (tested),
and closer to fp32. Measured with bench/encode.py on a 2-core AVX-512 VNNI Xeon (ViT-B/32, batch 32, real
photos): centred cosine to fp32 0.9993 against 0.9974 per batch, for 25.9 against 31.1 images/s (ViT-B/16:
10.1 against 10.5; fp32 16.8 and 4.4).

`linears.swap_linears` covers CLIP's packed q/k/v projection too (a third of each block's GEMM work); the
MLPs become `Int8MLP` (hidden rows quantised by a bound, so that the GELU is evaluated once) and the ViT's
patch convolution `Int8PatchEmbedding` (a GEMM over flattened patches). Where this torch build lacks oneDNN's
int8 Linear, `torch.ao`'s dynamic (per-batch) quantisation is used, for the Linear layers only.

Eager, the quantisation costs several passes over each activation. With `compile=True` the GEMM is the
custom op `clipserve::int8_gemm`, opaque to inductor, which fuses the passes around it: the row max and
rounding into the LayerNorm or GELU before, the row scale and bias into the residual add after.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn

from clipserve.config import PreprocessConfig
from clipserve.engine.linears import ProjectedAttention, kernel_error, swap_linears
from clipserve.models.layers import MLP, Attention, QuickGELU
from clipserve.models.vision import VisionTransformer

log = logging.getLogger(__name__)

INT8 = "int8"
# Activations are unsigned around this zero point: oneDNN's fast int8 kernels take u8 x s8 (VNNI's vpdpbusd).
ACTIVATION_ZERO_POINT = 128
# The quantised-tensor factory below is the one fused float -> uint8 rounding op in torch (one pass, vectorised);
# torch marks the quantised-tensor API deprecated, and its warning would reach every int8 user.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (uint8 [M, K] around ACTIVATION_ZERO_POINT, scale [M, 1]) with x ~ (q - 128) * scale."""
    absmax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).clamp_(min=1e-12)
    return quantize_scaled(torch.mul(x, 127.0 / absmax)), absmax.div_(127.0)


def quantize_scaled(scaled: torch.Tensor) -> torch.Tensor:
    """Values already scaled into [-127, 127] -> uint8 around ACTIVATION_ZERO_POINT, rounded half to even."""
    if torch.compiler.is_compiling():
        # Plain arithmetic that inductor fuses with the LayerNorm / GELU before it; the same rounding as the
        # eager op below, which has no lowering.
        return scaled.round_().add_(ACTIVATION_ZERO_POINT).to(torch.uint8)
    quantised = torch.quantize_per_tensor(scaled, 1.0, ACTIVATION_ZERO_POINT, torch.quint8)
    # The same bytes as a plain uint8 tensor, without a copy. Not `.view(torch.uint8)`: that view keeps the
    # quantised dispatch key, and ordinary ops on it (slicing, printing) fail or crash the process.
    return torch.empty(0, dtype=torch.uint8).set_(quantised.untyped_storage(), 0, quantised.shape, quantised.stride())


@torch.library.custom_op("clipserve::int8_gemm", mutates_args=())
def int8_gemm(
    q: torch.Tensor, packed_weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor
) -> torch.Tensor:
    """uint8 rows [M, K] (`quantize_rows`) x packed s8 weights -> (q - 128) @ W_q^T * channel_scale [M, N], fp32.

    A custom op so that torch.compile keeps oneDNN's GEMM as one opaque call (inductor's own lowering of
    `qlinear_pointwise` expects its quantisation passes' graph) and compiles the elementwise work around it.
    """
    return torch.ops.onednn.qlinear_pointwise.default(
        q, 1.0, ACTIVATION_ZERO_POINT, packed_weight, weight_scale, weight_zero_point,
        None, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


@int8_gemm.register_fake
def _int8_gemm_shape(
    q: torch.Tensor, packed_weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor
) -> torch.Tensor:
    return q.new_empty((q.shape[0], weight_scale.shape[0]), dtype=torch.float32)


def quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, K] -> (int8 [N, K], scale [N]), symmetric per output channel: W ~ W_q * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b on oneDNN's int8 GEMM: W per output channel, x per row, both symmetric."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        with torch.no_grad():
            int8_weight, scale = quantize_channels(weight)
            self.register_buffer("packed_weight", torch.ops.onednn.qlinear_prepack(int8_weight, None))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.long))
            bias = torch.zeros(self.out_features) if bias is None else bias.detach().float().clone()
            self.register_buffer("bias", bias)

    def gemm(self, q: torch.Tensor) -> torch.Tensor:
        """uint8 rows from `quantize_rows` [M, K] -> (q - 128) @ W_q^T * channel_scale [M, N], float32."""
        return int8_gemm(q, self.packed_weight, self.weight_scale, self.weight_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, row_scale = quantize_rows(x.reshape(-1, self.in_features))
        y = self.gemm(q)
        torch.addcmul(self.bias, y, row_scale, out=y)  # row scale and bias in one pass
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations per row"


# GELU (erf or tanh form) and QuickGELU stay below x for x >= 0 and above -0.171 everywhere (minima: GELU -0.16997,
# its tanh form -0.17004, QuickGELU -0.1636), so |act(h)| <= max(max h, ACTIVATION_FLOOR) on every row.
ACTIVATION_FLOOR = 0.171
BOUNDED_ACTIVATIONS = (nn.GELU, QuickGELU)


class Int8MLP(nn.Module):
    """`MLP` on two int8 GEMMs, the hidden rows quantised by a bound instead of their measured max.

    Quantising act(h) by its own row max costs a pass evaluating the activation (an erf per value) before the
    pass that quantises: inductor recomputes the activation rather than store the [M, 4W] rows between them.
    The bound `max(max h, ACTIVATION_FLOOR)` needs only the pre-activation's max, so the activation runs once,
    in the quantising pass. It exceeds the measured max by the factor 1 / Phi(max h) (GELU): 0.1% for a row
    whose largest pre-activation is 3, 2% at 2; those rows quantise that much coarser. (Bounding by
    act(max h) instead is as tight as the max but no faster: inductor re-evaluates that per-row erf in the
    inner loops of both its consumers.) With `Int8PatchEmbedding`, ViT-B/32 batch 32 on a 2-core AVX-512
    EPYC (`bench/int8_ablation.py`, two runs): 109.4 against 102.1 and 108.2 against 99.3 images/s compiled,
    110.6 against 104.3 and 105.0 against 97.2 eager, against `Int8Linear`s alone.
    """

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        if not isinstance(mlp.gelu, BOUNDED_ACTIVATIONS):
            raise TypeError(f"Int8MLP needs an activation bounded below by -{ACTIVATION_FLOOR}, not {mlp.gelu}")
        self.c_fc = Int8Linear(mlp.c_fc.weight, mlp.c_fc.bias)
        self.gelu = mlp.gelu
        self.c_proj = Int8Linear(mlp.c_proj.weight, mlp.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, row_scale = quantize_rows(x.reshape(-1, self.c_fc.in_features))
        h = torch.addcmul(self.c_fc.bias, self.c_fc.gemm(q), row_scale)  # pre-activation [M, 4W]
        bound = torch.clamp(h.amax(dim=1, keepdim=True), min=ACTIVATION_FLOOR)  # >= |act(h)| on its row
        q_hidden = quantize_scaled(self.gelu(h).mul_(127.0 / bound))
        y = torch.addcmul(self.c_proj.bias, self.c_proj.gemm(q_hidden), bound.div_(127.0))
        return y.reshape(*x.shape[:-1], self.c_proj.out_features)


@torch.library.custom_op("clipserve::bf16_attention", mutates_args=())
def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention with fp32 logits and bf16 weights: q float32 [B, H, Q, Dh], k float32 and v bfloat16
    [B, H, L, Dh] -> bfloat16 [B, H, Q, Dh].

    Logits stay fp32 (a bf16 logit of 30 is off by up to 0.06, which moves its weight by 6%); the
    probabilities, in [0, 1], and the values are rounded to bf16 (relative error 2^-9, below the int8
    rounding of the output projection's input that follows) for the second product, the larger of the two
    here. A custom op so that inductor keeps both batched GEMMs as they are instead of decomposing them.
    """
    batch, heads, queries, dim = q.shape
    length = k.shape[2]
    logits = torch.bmm(q.reshape(-1, queries, dim), k.reshape(-1, length, dim).transpose(1, 2)).mul_(dim**-0.5)
    if causal:  # query i sits at position i (the first queries of the sequence)
        mask = torch.ones(queries, length, dtype=torch.bool, device=q.device).triu_(1)
        logits.masked_fill_(mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1).to(torch.bfloat16)  # [B*H, Q, L]
    return torch.bmm(weights, v.reshape(-1, length, dim)).view(batch, heads, queries, dim)


@bf16_attention.register_fake
def _bf16_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.bfloat16)


class BF16Attention(ProjectedAttention):
    """Attention with int8 q/k/v and output projections and `bf16_attention` between them.

    For CPUs with bf16 dot products (AVX-512 BF16, AMX), in ViTs of few tokens (`BF16_ATTENTION_MAX_TOKENS`,
    where the reasons are), with `compile=True` (`loading.bf16_attention_products`: eager it ran slower).
    ViT-B/32, batch 32, on a 2-core AVX-512 BF16 EPYC, compiled, against torch's fp32 flash attention
    (`bench/int8_ablation.py`, four runs): -0.7% to +3.9%, +2.0% on average; centred cosine to fp32 0.99835
    against 0.99840. bf16 logits as well were faster still in a scratch timing, not taken for the reason above.
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__(attn, Int8Linear)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        return bf16_attention(q.contiguous(), k.contiguous(), v.to(torch.bfloat16).contiguous(), causal).float()


class Int8PatchEmbedding(nn.Module):
    """The ViT's patch convolution (kernel = stride = patch, no bias) as an int8 GEMM over flattened patches.

    Each patch is a row of p*p*3 pixels. Normalised float pixels are quantised per row like any Linear input.
    Given the preprocessing's `pixels` (mean and std), it also takes the decoder's raw uint8 pixels
    (`Model.encode_uint8`), with the normalisation folded into a second set of weights: conv((u/255 - mean) /
    std) = conv'(u) + offset, and u, an integer in [0, 255], is exactly the GEMM's uint8 input around its zero
    point 128. That spares the float normalisation pass and the patches' row quantisation, and is more exact
    (only the weights are rounded). Returns the convolution's [B, W, g, g] as a view of the GEMM's [B, g, g, W]
    rows, which the tower flattens to tokens without a copy. The fp32 convolution it replaces took 20 ms of
    a 344 ms ViT-B/32 batch (compiled int8, batch 32, `bench/breakdown.py`); the tokens' relative error is a
    Linear's (tested below 2%). From uint8 pixels, ViT-B/32 batch 32 on a 2-core AVX-512 EPYC
    (`bench/int8_ablation.py`, two runs, against normalising and taking floats): +5.2% and +4.3% eager,
    +2.6% and +3.0% compiled.
    """

    def __init__(self, conv: nn.Conv2d, pixels: PreprocessConfig | None = None) -> None:
        super().__init__()
        if conv.bias is not None or conv.kernel_size != conv.stride or conv.padding != (0, 0):
            raise ValueError(f"Int8PatchEmbedding needs a patchifying convolution without bias, not {conv}")
        self.patch = conv.kernel_size[0]
        # [W, 3, p, p] -> [W, p, p, 3] rows: patches are cut from channels-last pixels with the channel innermost
        weight = conv.weight.detach().float().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        self.linear = Int8Linear(weight, None)
        self.raw_linear: Int8Linear | None = None
        if pixels is not None:
            # per column (channel innermost): x = u * gain + shift, u the raw pixel value
            mean, std = (torch.tensor(v, dtype=torch.float64).repeat(self.patch**2) for v in (pixels.mean, pixels.std))
            gain, shift = 1 / (255 * std), -mean / std
            folded = (weight.double() * gain).float()
            # The GEMM multiplies u - 128 (its zero point): add back 128 x the exact folded weights' row sums,
            # so that the weights' rounding error meets only the centred u - 128, as it meets centred normalised
            # pixels on the float path (with the rounded weights' sums it would also scale u's mean, ~128).
            offset = weight.double() @ shift + 128 * folded.double().sum(dim=1)
            self.raw_linear = Int8Linear(folded, offset.float())

    @property
    def takes_uint8(self) -> bool:
        """Whether `forward` takes raw uint8 pixels (the normalisation is folded in) as well as float ones."""
        return self.raw_linear is not None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W], normalised floats or (`takes_uint8`) raw uint8 -> [B, W, g, g]."""
        batch, channels, height, width = pixels.shape
        p, rows, cols = self.patch, height // self.patch, width // self.patch
        patches = pixels[:, :, : rows * p, : cols * p].reshape(batch, channels, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows, cols, p * p * channels)
        if pixels.dtype != torch.uint8:
            return self.linear(patches).permute(0, 3, 1, 2)
        if self.raw_linear is None:
            raise TypeError("this patch embedding takes normalised float pixels, not uint8 (no normalisation given)")
        tokens = self.raw_linear.gemm(patches.reshape(-1, p * p * channels).contiguous()).add_(self.raw_linear.bias)
        return tokens.view(batch, rows, cols, -1).permute(0, 3, 1, 2)  # [B, W, g, g]


def takes_uint8_pixels(module: nn.Module) -> bool:
    """Whether `module`'s image tower takes the decoder's raw uint8 pixels (an `Int8PatchEmbedding` given the
    preprocessing's normalisation)."""
    return any(isinstance(m, Int8PatchEmbedding) and m.takes_uint8 for m in module.modules())


@functools.cache
def int8_rows_available() -> bool:
    """Whether this torch build runs `Int8Linear`, checked once against float arithmetic."""
    error = kernel_error(Int8Linear, "oneDNN int8 Linear", "int8 uses torch.ao dynamic quantisation")
    return error is not None and error < 0.2  # 16 products of two 1/254-quantised N(0,1) factors: errors ~0.05


# For the fallback. Measured on an AVX2 EPYC (2 cores, ViT-B/32 batch 32, bench/encode.py): onednn's dynamic
# Linear ran 2-3x faster than fbgemm and "x86" (which dispatches to fbgemm for dynamic Linear).
ENGINE_PREFERENCE = ("onednn", "x86", "fbgemm")


def quantized_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in ENGINE_PREFERENCE if engine in supported), supported[0])


def dynamic_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """torch.ao's dynamically quantised Linear (one activation scale per batch): the fallback."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


# `bf16_attention` materialises each head's [L, L] logits in fp32: faster than torch's flash attention at
# ViT-B/32's 50 tokens, slower at ViT-B/16's 197 (bench/int8_ablation.py on a 2-core AVX-512 BF16 EPYC,
# batch 32, against Int8MLP and the int8 patch GEMM alone: 16.4 against 18.9 images/s eager, 18.9 against
# 23.8 compiled). Text towers keep flash attention: their length varies per batch, and is unmeasured.
BF16_ATTENTION_MAX_TOKENS = 64


def quantize_int8(
    module: nn.Module, bf16_products: bool = False, pixels: PreprocessConfig | None = None
) -> nn.Module:
    """Quantise, in place, every Linear layer (and CLIP's packed attention projection) of a float32 module,
    and, where oneDNN's int8 Linear runs, the MLPs as `Int8MLP`, ViT patch convolutions as
    `Int8PatchEmbedding` (which, given the preprocessing's normalisation `pixels`, also takes raw uint8
    pixels) and, with `bf16_products` (for CPUs with bf16 dot products), the attention of ViTs of at most
    `BF16_ATTENTION_MAX_TOKENS` tokens as `BF16Attention`.

    LayerNorms, attention's logits, the embeddings and the final projections stay in fp32 (a few percent of
    the FLOPs).
    CPU only: oneDNN's int8 kernels here have no CUDA implementation.
    """
    if next(module.parameters()).device.type != "cpu":
        raise ValueError("precision='int8' runs on CPU only (its int8 kernels have no CUDA implementation)")
    if not int8_rows_available():  # the fallback's packed weights belong to torch's process-wide engine
        torch.backends.quantized.engine = quantized_engine()
        return swap_linears(module, dynamic_int8_linear)
    swap_int8_blocks(module, pixels)
    if bf16_products:
        for vit in [m for m in module.modules() if isinstance(m, VisionTransformer)]:
            if vit.cfg.grid_size**2 + 1 <= BF16_ATTENTION_MAX_TOKENS:
                use_bf16_attention(vit)
    return swap_linears(module, Int8Linear)


def swap_int8_blocks(module: nn.Module, pixels: PreprocessConfig | None = None) -> None:
    """Replace, in place, each `MLP` with a bounded activation by `Int8MLP` and each ViT `conv1` by
    `Int8PatchEmbedding` (with the normalisation `pixels`)."""
    for name, child in list(module.named_children()):
        if type(child) is MLP and isinstance(child.gelu, BOUNDED_ACTIVATIONS):
            setattr(module, name, Int8MLP(child))
        elif isinstance(module, VisionTransformer) and name == "conv1":
            setattr(module, name, Int8PatchEmbedding(child, pixels))
        else:
            swap_int8_blocks(child, pixels)


def use_bf16_attention(module: nn.Module) -> None:
    """Replace, in place, each CLIP `Attention` in `module` by `BF16Attention`."""
    for name, child in list(module.named_children()):
        if type(child) is Attention:
            setattr(module, name, BF16Attention(child))
        else:
            use_bf16_attention(child)
