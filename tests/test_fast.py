"""Fast paths keep the embeddings: int8 / bf16 / fp16, the ONNX backend, fast decode, length-sorted text
batches, the decode pool and thread plans.

Random weights make unrelated photos' embeddings nearly parallel (cosine ~0.98), so every cosine is also
checked with the batch mean removed from both sides (`centred_cosine`), and on the trained digits model.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipserve
from clipserve.config import PreprocessConfig, VisionConfig
from clipserve.engine import loading, onnx_backend
from clipserve.engine.fast import ThreadPlan, encode_length_sorted, length_sorted_chunks, normalise_uint8
from clipserve.engine.linears import OneDNNLinear, ProjectedAttention, onednn_linear_available
from clipserve.engine.loading import build_module, resolve
from clipserve.engine.pipeline import DecodePool
from clipserve.engine.quantize import (
    ACTIVATION_FLOOR,
    ACTIVATION_ZERO_POINT,
    BF16_ATTENTION_MAX_TOKENS,
    BF16Attention,
    Int8Linear,
    Int8MLP,
    Int8PatchEmbedding,
    bf16_attention,
    int8_rows_available,
    quantize_int8,
    quantize_rows,
)
from clipserve.io.images import ImageError
from clipserve.models.layers import MLP, QuickGELU
from clipserve.models.vision import VisionTransformer

PROMPTS = [
    "a photo of an astronaut.",
    "a cat",
    "a cup of coffee on a wooden table next to a newspaper, seen from above",
    "a rocket on the launch pad",
    "the great wall of china in autumn with mountains behind it",
    "a flower",
    "x",
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine after removing each side's batch mean: what distinguishes the rows, not what they share."""
    return cosine(a - a.mean(0), b - b.mean(0))


def photo_jpegs() -> list[bytes]:
    """The six real photos (scikit-image, scikit-learn), upscaled to 1024 px wide JPEGs like uploads."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), *load_sample_images().images]
    out = []
    for array in arrays:
        image = Image.fromarray(array).convert("RGB")
        image = image.resize((1024, round(1024 * image.height / image.width)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return photo_jpegs()


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Path:
    root = tmp_path_factory.mktemp("clipserve-cache")
    monkeypatch_module.setenv("CLIPSERVE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def vit_b32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from checkpoint_factory import open_clip_model, write_open_clip_dir
    from oracles import open_clip

    oc = open_clip()
    cfg = oc.get_model_config("ViT-B-32")
    return write_open_clip_dir(tmp_path_factory.mktemp("b32") / "vit-b-32", open_clip_model("ViT-B-32"), cfg)


@pytest.fixture(scope="module")
def vit_b32_reference(vit_b32_checkpoint: Path, photos: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    model = clipserve.load(str(vit_b32_checkpoint), precision="fp32")
    return model.encode_image(photos), model.encode_text(PROMPTS)


# -- precision paths on ViT-B/32 (real architecture, random weights) ---------------------------------------


@pytest.mark.parametrize(
    ("precision", "image_min", "text_min"),
    [("int8", 0.995, 0.995), ("bf16", 0.995, 0.995), ("fp16", 0.9999, 0.9999)],
)
def test_precision_keeps_cosine_on_photos(
    vit_b32_checkpoint: Path,
    vit_b32_reference,
    photos: list[bytes],
    precision: str,
    image_min: float,
    text_min: float,
) -> None:
    ref_image, ref_text = vit_b32_reference
    model = clipserve.load(str(vit_b32_checkpoint), precision=precision)
    image, text = model.encode_image(photos), model.encode_text(PROMPTS)
    assert image.dtype == torch.float32 and image.shape == ref_image.shape
    assert cosine(image, ref_image).min() >= image_min
    assert cosine(text, ref_text).min() >= text_min
    # with the shared direction removed the threshold is looser but still far above unrelated rows (~0)
    assert centred_cosine(image, ref_image).min() >= 0.95
    assert centred_cosine(text, ref_text).min() >= 0.95


def test_int8_quantises_every_block_projection(vit_b32_checkpoint: Path) -> None:
    assert int8_rows_available()  # the CPU torch wheel this project installs has oneDNN's int8 Linear
    model = clipserve.load(str(vit_b32_checkpoint), precision="int8")
    attentions = [m for m in model.module.modules() if isinstance(m, ProjectedAttention)]
    assert len(attentions) == 24  # 12 vision + 12 text blocks, packed q/k/v included
    assert all(type(a.qkv) is Int8Linear for a in attentions)
    assert len([m for m in model.module.modules() if type(m) is Int8MLP]) == 24
    assert type(model.module.visual.conv1) is Int8PatchEmbedding
    float_layers = [n for n, m in model.module.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    assert float_layers == []
    assert model.info.parameters == clipserve.load(str(vit_b32_checkpoint)).info.parameters


def test_quantised_rows_are_a_plain_uint8_tensor() -> None:
    """Rows quantised eagerly are ordinary uint8 (a `.view` of torch's quantised tensor kept its dispatch key,
    and slicing or printing it crashed the process), rounded half to even like the compiled path."""
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(x)
    assert q.dtype == torch.uint8 and q.shape == (40, 96) and not q.is_quantized
    expected = torch.round(x * (127.0 / x.abs().amax(dim=1, keepdim=True))) + ACTIVATION_ZERO_POINT
    assert torch.equal(q.int(), expected.int())
    assert torch.allclose(scale, x.abs().amax(dim=1, keepdim=True) / 127.0)
    linear = Int8Linear(torch.randn(24, 96), None)
    part = q[5:9].clone()  # the rows of a slice multiply like the same rows of the whole
    assert torch.equal(linear.gemm(part), linear.gemm(q)[5:9])
    assert "uint8" in repr(q[:2])


@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), QuickGELU()])
def test_int8_mlp_bound_covers_every_activation_value(act: torch.nn.Module) -> None:
    """`Int8MLP` quantises act(h) by max(max h, ACTIVATION_FLOOR): no value of the activation may exceed it."""
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    y = act(x)
    assert (y.abs() <= torch.clamp(x, min=ACTIVATION_FLOOR)).all()
    assert y.min() < -0.16  # the floor is tight, not a wide margin


def test_int8_mlp_matches_the_float_mlp_and_rejects_unbounded_activations() -> None:
    torch.manual_seed(0)
    mlp = MLP(64, 256, quick_gelu=False).eval()
    x = torch.randn(3, 10, 64) * 3
    with torch.inference_mode():
        expected, got = mlp(x), Int8MLP(mlp)(x)
    assert got.shape == expected.shape
    assert (got - expected).norm() / expected.norm() < 0.02
    # a row whose pre-activations are all below the floor quantises against the floor, not a zero range
    with torch.inference_mode():
        quiet = torch.full((1, 64), -5.0)
        torch.testing.assert_close(Int8MLP(mlp)(quiet), mlp(quiet), atol=0.05, rtol=0.05)
    mlp.gelu = torch.nn.SiLU()  # dips to -0.28: the bound would clip it
    with pytest.raises(TypeError, match="bounded below"):
        Int8MLP(mlp)
    swapped = quantize_int8(torch.nn.Sequential(mlp))
    assert type(swapped[0]) is MLP and type(swapped[0].c_fc) is Int8Linear  # per-row Linears instead


@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_patch_embedding_is_the_patch_convolution(channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 48, kernel_size=8, stride=8, bias=False)
    pixels = torch.randn(2, 3, 36, 36)  # 4 pixels past the last whole patch, which the convolution ignores
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = conv(pixels), Int8PatchEmbedding(conv)(pixels)
    assert got.shape == expected.shape == (2, 48, 4, 4)
    assert (got - expected).norm() / expected.norm() < 0.02
    assert got.flatten(2).transpose(1, 2).is_contiguous()  # tokens [B, g*g, W] without a copy
    with pytest.raises(ValueError, match="patchifying convolution"):
        Int8PatchEmbedding(torch.nn.Conv2d(3, 8, kernel_size=8, stride=4, bias=False))


def test_int8_patch_embedding_folds_the_normalisation_for_uint8_pixels() -> None:
    """Given the preprocessing's mean and std, raw uint8 pixels give the convolution of the normalised pixels,
    closer than the float path (only the weights are rounded, not the pixels)."""
    torch.manual_seed(0)
    cfg = PreprocessConfig()
    conv = torch.nn.Conv2d(3, 64, kernel_size=8, stride=8, bias=False)
    raw = torch.randint(0, 256, (2, 36, 36, 3), dtype=torch.uint8)  # the decode buffer's NHWC rows
    pixels = normalise_uint8(raw, cfg.mean, cfg.std)
    embedding = Int8PatchEmbedding(conv, cfg)
    assert embedding.takes_uint8 and not Int8PatchEmbedding(conv).takes_uint8
    with torch.inference_mode():
        expected, from_floats, from_uint8 = conv(pixels), embedding(pixels), embedding(raw.permute(0, 3, 1, 2))
    assert from_uint8.shape == expected.shape == (2, 64, 4, 4) and from_uint8.dtype == torch.float32
    error = (from_uint8 - expected).norm() / expected.norm()
    assert error < 0.01 and error < (from_floats - expected).norm() / expected.norm()
    with pytest.raises(TypeError, match="normalised float pixels"):
        Int8PatchEmbedding(conv)(raw.permute(0, 3, 1, 2))


def test_int8_model_feeds_the_decoders_uint8_pixels_to_the_tower(tiny_checkpoint: Path, photos: list[bytes]) -> None:
    int8, fp32 = (clipserve.load(str(tiny_checkpoint), precision=p) for p in ("int8", "fp32"))
    assert int8.uint8_pixels and not fp32.uint8_pixels
    raw = torch.stack([int8.preprocessor.decode(photo) for photo in photos])
    from_uint8 = int8.encode_uint8(raw)
    from_floats = int8.encode_pixels(normalise_uint8(raw, int8.preprocess_cfg.mean, int8.preprocess_cfg.std))
    assert cosine(from_uint8, from_floats).min() >= 0.999  # two roundings of the same patch embedding
    torch.testing.assert_close(int8.encode_image(photos), from_uint8)
    torch.testing.assert_close(fp32.encode_uint8(raw), fp32.encode_image(photos))
    for model in (int8, fp32):  # each entry point takes its own kind of pixels, and says so
        with pytest.raises(ValueError, match=r"normalised float tensor .* go to encode_uint8"):
            model.encode_pixels(raw.permute(0, 3, 1, 2))
        with pytest.raises(ValueError, match=r"expected uint8 pixels \[N, H, W, 3\]"):
            model.encode_uint8(raw.permute(0, 3, 1, 2))


@pytest.mark.parametrize(("causal", "queries"), [(False, 17), (True, 17), (False, 1)])
def test_bf16_attention_matches_scaled_dot_product_attention(causal: bool, queries: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=generator) * 2 for _ in range(3))
    q = q[:, :, :queries].contiguous()  # the last block of a ViT asks for its class token alone
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = bf16_attention(q, k, v.bfloat16(), causal)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert (got.float() - expected).norm() / expected.norm() < 1e-2
    torch.library.opcheck(bf16_attention, (q, k, v.bfloat16(), causal))  # the fake kernel agrees (compile)


@pytest.mark.parametrize(
    ("flags", "compile", "bf16_products"),
    [({"avx512_vnni", "avx512_bf16"}, True, True), ({"avx512_vnni", "avx512_bf16"}, False, False),
     ({"avx512_vnni", "amx_bf16"}, True, True), ({"avx512_vnni"}, True, False)],
)  # fmt: skip
def test_int8_attention_products_in_bf16_only_compiled_on_bf16_cpus(
    monkeypatch, flags: set[str], compile: bool, bf16_products: bool
) -> None:
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset(flags))
    assert loading.bf16_attention_products(compile) == bf16_products


def test_int8_bf16_attention_keeps_the_embeddings(
    vit_b32_checkpoint: Path, vit_b32_reference, photos: list[bytes], monkeypatch
) -> None:
    eager = clipserve.load(str(vit_b32_checkpoint), precision="int8")
    assert not any(type(m) is BF16Attention for m in eager.module.modules())  # eager: flash attention
    monkeypatch.setattr(loading, "bf16_attention_products", lambda compile: True)  # compile=True's, eager here
    model = clipserve.load(str(vit_b32_checkpoint), precision="int8")
    assert len([m for m in model.module.visual.modules() if type(m) is BF16Attention]) == 12  # 50 tokens
    assert not any(type(m) is BF16Attention for m in model.module.text.modules())
    ref_image, ref_text = vit_b32_reference
    image, text = model.encode_image(photos), model.encode_text(PROMPTS)
    assert cosine(image, ref_image).min() >= 0.995 and centred_cosine(image, ref_image).min() >= 0.95
    assert cosine(text, ref_text).min() >= 0.995 and centred_cosine(text, ref_text).min() >= 0.95


@pytest.mark.parametrize(("image_size", "expected"), [(56, BF16Attention), (72, ProjectedAttention)])
def test_bf16_attention_only_for_vits_of_few_tokens(image_size: int, expected: type) -> None:
    """Materialised [L, L] logits beat flash attention at 50 tokens and lose at 197 (BF16_ATTENTION_MAX_TOKENS)."""
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(image_size=image_size, patch_size=8, width=64, layers=1, head_width=32), 16)
    for parameter in vit.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    tokens = (image_size // 8) ** 2 + 1  # 50 / 82
    assert (tokens <= BF16_ATTENTION_MAX_TOKENS) == (expected is BF16Attention)
    quantize_int8(vit, bf16_products=True)
    assert type(vit.transformer.resblocks[0].attn) is expected


def test_int8_embeddings_do_not_depend_on_batch_mates(tiny_checkpoint: Path, photos: list[bytes]) -> None:
    """Activations are quantised per row: an item embeds the same alone, in any batch, at any padding."""
    model = clipserve.load(str(tiny_checkpoint), precision="int8")
    together = model.encode_image(photos)
    for i, photo in enumerate(photos):
        torch.testing.assert_close(model.encode_image([photo]), together[i : i + 1], atol=1e-6, rtol=0)
    texts = model.encode_text(PROMPTS)  # padded to the longest prompt
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(model.encode_text([prompt]), texts[i : i + 1], atol=1e-6, rtol=0)
    # per-batch quantisation (the fallback, and ONNX Runtime's) fails this: one bright photo rescales the rest
    bright = torch.full((1, 3, 32, 32), 50.0)
    pixels = model.preprocessor.batch(photos[:2])
    alone = model.encode_pixels(pixels)
    torch.testing.assert_close(model.encode_pixels(torch.cat([pixels, bright]))[:2], alone, atol=1e-6, rtol=0)


def test_int8_falls_back_to_per_batch_quantisation(tiny_checkpoint: Path, photos, monkeypatch) -> None:
    rows = clipserve.load(str(tiny_checkpoint), precision="int8")
    monkeypatch.setattr("clipserve.engine.quantize.int8_rows_available", lambda: False)
    model = clipserve.load(str(tiny_checkpoint), precision="int8")
    assert not any(isinstance(m, Int8Linear) for m in model.module.modules())
    assert any(type(m) is torch.ao.nn.quantized.dynamic.Linear for m in model.module.modules())
    assert cosine(model.encode_image(photos), rows.encode_image(photos)).min() >= 0.99


def test_fp32_on_cpu_runs_every_linear_through_onednn_and_stays_exact(
    vit_b32_checkpoint: Path, vit_b32_reference, photos: list[bytes]
) -> None:
    assert onednn_linear_available()  # the CPU torch wheel this project installs has oneDNN
    model = clipserve.load(str(vit_b32_checkpoint), precision="fp32")
    assert [n for n, m in model.module.named_modules() if type(m) is torch.nn.Linear] == []
    attentions = [m for m in model.module.modules() if isinstance(m, ProjectedAttention)]
    assert len(attentions) == 24 and all(type(a.qkv) is OneDNNLinear for a in attentions)
    image, text = model.encode_image(photos), model.encode_text(PROMPTS)
    # the same fp32 arithmetic in another summation order: as exact as the unpacked module against open_clip
    assert (image - vit_b32_reference[0]).abs().max() < 1e-5 * vit_b32_reference[0].norm(dim=-1).max()
    assert (text - vit_b32_reference[1]).abs().max() < 1e-5 * vit_b32_reference[1].norm(dim=-1).max()


def test_fp32_falls_back_to_torch_linear_without_onednn(tiny_checkpoint: Path, monkeypatch) -> None:
    packed = clipserve.load(str(tiny_checkpoint), precision="fp32")
    assert any(isinstance(m, OneDNNLinear) for m in packed.module.modules())
    monkeypatch.setattr("clipserve.engine.linears.onednn_linear_available", lambda: False)
    model = clipserve.load(str(tiny_checkpoint), precision="fp32")
    assert not any(isinstance(m, (OneDNNLinear, ProjectedAttention)) for m in model.module.modules())
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model.encode_pixels(pixels), packed.encode_pixels(pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512f", "avx512_vnni"}, "int8"), ({"avx2", "avx_vnni"}, "int8")],
)
def test_auto_precision_on_cpu_follows_int8_dot_product_support(
    tiny_checkpoint: Path, monkeypatch, flags: set[str], expected: str
) -> None:
    monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset(flags))
    assert clipserve.load(str(tiny_checkpoint)).info.precision == expected
    assert clipserve.load(str(tiny_checkpoint), precision="fp32").info.precision == "fp32"


def test_auto_precision_on_gpu_is_bf16_where_supported(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert loading.resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert loading.resolve_precision("auto", "cuda") == "fp16"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compiled_towers_match_eager_across_batch_sizes_and_lengths(tiny_checkpoint: Path, precision: str) -> None:
    eager = clipserve.load(str(tiny_checkpoint), precision=precision)
    compiled = clipserve.load(str(tiny_checkpoint), precision=precision, compile=True)
    assert type(compiled.module.visual).__name__ == "BatchDynamicTower"
    assert torch._dynamo.config.recompile_limit >= loading.RECOMPILE_LIMIT  # several compiled models fit
    assert hasattr(compiled.module.text.encode_trimmed, "_torchdynamo_orig_callable")
    if precision == "fp32":  # oneDNN's packed Linear stays under compile (an opaque op), not torch's default GEMM
        assert onednn_linear_available()
        assert any(isinstance(m, OneDNNLinear) for m in compiled.module.modules())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if precision == "fp32":
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        else:
            # Inductor's fused LayerNorm and GELU differ from eager's in the last bit, which now and then moves
            # a value across an int8 rounding boundary: one quantisation step of one element, not bit-exact.
            assert F.cosine_similarity(actual, expected).min() >= 0.9999

    pixels = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    raw = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert compiled.uint8_pixels == (precision == "int8")
    for batch in (2, 20, 1):
        assert_same(compiled.encode_pixels(pixels[:batch]), eager.encode_pixels(pixels[:batch]))
        assert_same(compiled.encode_uint8(raw[:batch]), eager.encode_uint8(raw[:batch]))
    for prompts in (PROMPTS, ["a", "b c"], ["a b c d e f"]):
        assert_same(compiled.encode_text(prompts), eager.encode_text(prompts))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # all compiled by `load`
    with pytest.raises(ValueError, match="compile=True needs backend='torch'"):
        clipserve.load(str(tiny_checkpoint), backend="onnx", compile=True)


def test_compile_cache_is_keyed_to_the_custom_ops_source() -> None:
    with torch.compiler.config.patch(cache_key_tag="mine"):
        loading.tag_compile_cache()
        loading.tag_compile_cache()  # once only
        assert torch.compiler.config.cache_key_tag == f"mine+clipserve-ops-{loading.custom_ops_digest()}"
    source = b"".join(Path(m.__file__).read_bytes() for m in (loading.linears, loading.quantize))
    assert loading.custom_ops_digest() == hashlib.sha256(source).hexdigest()[:16]


def test_compiled_int8_needs_onednn_int8_linear(tiny_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setattr("clipserve.engine.loading.int8_rows_available", lambda: False)
    with pytest.raises(ValueError, match="needs oneDNN's int8 Linear"):
        clipserve.load(str(tiny_checkpoint), precision="int8", compile=True)


def test_fast_decode_keeps_cosine(vit_b32_checkpoint: Path, vit_b32_reference, photos: list[bytes]) -> None:
    model = clipserve.load(str(vit_b32_checkpoint), precision="fp32")
    fast = model.encode_image(photos, fast_decode=True)
    assert cosine(fast, vit_b32_reference[0]).min() >= 0.995
    assert centred_cosine(fast, vit_b32_reference[0]).min() >= 0.9
    labels = ["a cat", "a rocket"]
    exact_probs = model.classify(model.preprocessor.batch(photos), labels)
    torch.testing.assert_close(model.classify(photos, labels, fast_decode=True), exact_probs, atol=0.02, rtol=0)


@pytest.mark.parametrize(
    ("size", "interpolation", "resize_mode"),
    [((1024, 683), "bicubic", "shortest"), ((300, 700), "bilinear", "shortest"), ((640, 480), "bicubic", "squash")],
)
def test_torch_resize_is_within_one_level_of_pillow(
    photos: list[bytes], size: tuple[int, int], interpolation: str, resize_mode: str
) -> None:
    from clipserve.config import PreprocessConfig
    from clipserve.io.images import Preprocessor

    pre = Preprocessor(PreprocessConfig(size=224, interpolation=interpolation, resize_mode=resize_mode))
    for jpeg in photos[:3]:
        image = Image.open(io.BytesIO(jpeg)).resize(size)
        exact = torch.from_numpy(pre.to_uint8(image)).int()
        fast = pre.resize_crop(pre.rgb_tensor(image))
        assert fast.shape == (224, 224, 3) and fast.dtype == torch.uint8
        difference = (fast.int() - exact).abs()
        assert difference.max() <= 1 and difference.float().mean() < 0.2


def test_fast_decode_resizes_palette_images_like_open_clip() -> None:
    """Palette and 1-bit images: open_clip resizes them with NEAREST, and so does the fast path (exactly)."""
    from clipserve.config import PreprocessConfig
    from clipserve.io.images import Preprocessor

    pre = Preprocessor(PreprocessConfig(size=224))
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    smooth = Image.fromarray(noise).resize((640, 480), Image.Resampling.BICUBIC)
    for image, fmt in ((smooth.convert("P"), "GIF"), (smooth.convert("1"), "PNG"), (smooth, "JPEG")):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        exact, fast = pre.decode(buffer.getvalue()), pre.decode(buffer.getvalue(), fast=True)
        assert fast.shape == exact.shape == (224, 224, 3)
        difference = (fast.int() - exact.int()).abs().float().mean()
        assert difference == 0 if fmt != "JPEG" else 0 < difference < 2  # JPEG: draft decode, torch resize


def test_resize_on_an_accelerator_is_the_float_resize_rounded(photos: list[bytes], monkeypatch) -> None:
    """CUDA has no uint8 antialiased resize: the device path resizes floats. Exercised here on the CPU.

    Pillow rounds and clips between its horizontal and vertical passes, floats do not: a few levels apart where
    bicubic overshoots (edges), more on noise."""
    from clipserve.config import PreprocessConfig
    from clipserve.io.images import Preprocessor

    pre = Preprocessor(PreprocessConfig(size=224))
    images = [Image.open(io.BytesIO(jpeg)) for jpeg in photos[:3]]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 60, 3), dtype=np.uint8))  # upsampled
    monkeypatch.setattr("clipserve.io.images._resizes_uint8", lambda device: False)
    for image, max_levels, mean_levels in [*((i, 4, 0.2) for i in images), (noise, 255, 0.5)]:
        resized = pre.resize_crop(pre.rgb_tensor(image))
        assert resized.dtype == torch.uint8 and resized.shape == (224, 224, 3)
        difference = (resized.int() - torch.from_numpy(pre.to_uint8(image)).int()).abs()
        assert difference.max() <= max_levels and difference.float().mean() < mean_levels
    with DecodePool(pre, workers=2, fast_decode=True) as on_workers:
        with DecodePool(pre, workers=2, fast_decode=True, resize_device=torch.device("cpu")) as on_device:
            assert [b.shape[0] for b in on_device.batches(photos, 4)] == [4, 2]
            assert torch.equal(on_device.decode(photos), on_workers.decode(photos))
    with pytest.raises(ValueError, match="needs fast_decode=True"):
        DecodePool(pre, resize_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="expected uint8"):
        pre.resize_crop(torch.zeros(10, 10, 3))


# -- ONNX backend ---------------------------------------------------------------------------------------


def test_onnx_export_matches_torch_dynamic_batch_and_length(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = clipserve.load(str(tiny_checkpoint), precision="fp32")
    resolved = resolve(str(tiny_checkpoint))
    clip = build_module(resolved.model_cfg, resolved.state, resolved.source, torch.float32)  # unpacked Linears
    directory = onnx_backend.export(clip, tmp_path / "onnx")
    image = ort.InferenceSession(
        str(directory / onnx_backend.IMAGE_GRAPH), providers=["CPUExecutionProvider"]
    )
    text = ort.InferenceSession(str(directory / onnx_backend.TEXT_GRAPH), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):  # the export example had batch 2
        pixels = torch.randn(batch, 3, 32, 32)
        (out,) = image.run(None, {"pixels": pixels.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model.encode_pixels(pixels), atol=1e-4, rtol=1e-4)
    for prompts in (
        ["a"],
        PROMPTS,
        ["a much longer prompt than the example had, with many more tokens in it"] * 3,
    ):
        tokens = model.tokenize(prompts)
        trimmed = tokens[:, : int(model.module.token_lengths(tokens).max())]
        assert trimmed.shape[1] != 8 or len(prompts) != 2  # not the example's shape
        (out,) = text.run(None, {"tokens": trimmed.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model.encode_tokens(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("precision", "minimum"), [("fp32", 0.99999), ("int8", 0.995)])
def test_onnx_backend_through_load(
    tiny_checkpoint: Path, onnx_cache: Path, photos, precision, minimum
) -> None:
    reference = clipserve.load(str(tiny_checkpoint), precision="fp32")
    model = clipserve.load(str(tiny_checkpoint), backend="onnx", precision=precision)
    assert model.info.backend == "onnx" and model.info.parameters == reference.info.parameters
    assert cosine(model.encode_image(photos), reference.encode_image(photos)).min() >= minimum
    assert cosine(model.encode_text(PROMPTS), reference.encode_text(PROMPTS)).min() >= minimum
    from clipserve.engine.loading import resolve

    key = onnx_backend.checkpoint_key(resolve(str(tiny_checkpoint)).state)
    assert (onnx_cache / "onnx" / key / onnx_backend.IMAGE_GRAPH).is_file()  # cached per weights, reused


def test_onnx_backend_refuses_what_it_cannot_run(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="backend='onnx'"):
        clipserve.load(str(tiny_checkpoint), backend="onnx", precision="bf16")
    with pytest.raises(ValueError, match="unknown backend"):
        clipserve.load(str(tiny_checkpoint), backend="tensorrt")


@pytest.mark.slow
def test_onnx_int8_keeps_cosine_on_vit_b32(
    vit_b32_checkpoint: Path, vit_b32_reference, photos, onnx_cache
) -> None:
    model = clipserve.load(str(vit_b32_checkpoint), backend="onnx", precision="int8")
    image, text = model.encode_image(photos), model.encode_text(PROMPTS)
    assert cosine(image, vit_b32_reference[0]).min() >= 0.995
    assert cosine(text, vit_b32_reference[1]).min() >= 0.995
    assert centred_cosine(image, vit_b32_reference[0]).min() >= 0.95


def test_export_command_writes_both_graphs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from clipserve.cli.main import main

    assert main(["export", "onnx", str(tiny_checkpoint), "--output", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").glob("*.onnx")} == {"image.onnx", "text.onnx"}


# -- trained model ---------------------------------------------------------------------------------------


def test_fast_paths_on_trained_digits_model(digits_checkpoint: Path, onnx_cache: Path) -> None:
    from clipserve.train.digits import load_split

    split = load_split("heldout")
    images, captions, labels = split.images[:64], split.captions[:64], torch.tensor(split.labels[:64])
    reference = clipserve.load(str(digits_checkpoint), precision="fp32")
    ref_image, ref_text = reference.encode_image(images), reference.encode_text(captions)
    for kwargs in ({"precision": "int8"}, {"precision": "bf16"}, {"backend": "onnx", "precision": "int8"}):
        model = clipserve.load(str(digits_checkpoint), **kwargs)
        image, text = model.encode_image(images), model.encode_text(captions)
        assert cosine(image, ref_image).min() >= 0.995, kwargs
        assert cosine(text, ref_text).min() >= 0.995, kwargs
        assert centred_cosine(image, ref_image).min() >= 0.98, kwargs
        # the ranking the model is for: each image's best caption names the same digit on nearly every row
        # (captions of one digit are near-ties, so the caption itself may trade places with its twins)
        same = labels[(image @ text.T).argmax(1)] == labels[(ref_image @ ref_text.T).argmax(1)]
        assert same.float().mean() >= 0.95, kwargs


# -- helpers ---------------------------------------------------------------------------------------------


def test_length_sorted_batches_restore_order_and_match(tiny_model) -> None:
    tokens = tiny_model.tokenize(PROMPTS * 3)
    whole = tiny_model.module.encode_text(tokens)
    lengths = tiny_model.module.token_lengths(tokens)
    chunks = length_sorted_chunks(lengths, 4)
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 1]
    assert all(lengths[a].min() >= lengths[b].max() for a, b in zip(chunks, chunks[1:], strict=False))
    with torch.inference_mode():
        sorted_out = encode_length_sorted(tokens, lengths, 4, tiny_model.module.encode_text)
    torch.testing.assert_close(sorted_out, whole, atol=1e-5, rtol=1e-5)


def test_normalise_uint8_is_bit_identical_to_preprocessing(tiny_model, photos: list[bytes]) -> None:
    with DecodePool(tiny_model.preprocessor, workers=2) as pool:
        batch = pool.decode(photos)
    cfg = tiny_model.preprocess_cfg
    assert torch.equal(normalise_uint8(batch, cfg.mean, cfg.std), tiny_model.preprocessor.batch(photos))


def test_decode_pool_overlaps_batches_and_reports_bad_images(tiny_model, photos: list[bytes]) -> None:
    with DecodePool(tiny_model.preprocessor, workers=2) as pool:
        batches = list(pool.batches(photos, 4))
        assert [b.shape[0] for b in batches] == [4, 2]
        assert torch.equal(torch.cat(batches), pool.decode(photos))
        with pytest.raises(ImageError):
            list(pool.batches([*photos[:3], b"not an image"], 2))
    with DecodePool(tiny_model.preprocessor, workers=0) as inline:
        assert torch.equal(inline.decode(photos), torch.cat(batches))

    class Counting:  # the preprocessor, counting the images decoded
        size = tiny_model.preprocessor.size
        calls = 0

        def decode(self, *args, **kwargs) -> torch.Tensor:
            self.calls += 1
            return tiny_model.preprocessor.decode(*args, **kwargs)

    counting = Counting()
    with DecodePool(counting, workers=2, prefetch=False) as on_demand:  # type: ignore[arg-type]
        decoded = on_demand.batches(photos, 4)
        assert torch.equal(next(decoded), batches[0]) and counting.calls == 4  # the next batch waits for us
        assert torch.equal(next(decoded), batches[1]) and counting.calls == 6


def test_encode_image_pipeline_equals_exact_preprocessing(tiny_model, photos: list[bytes]) -> None:
    exact = tiny_model.encode_pixels(tiny_model.preprocessor.batch(photos))
    for workers in (0, 1, 3):
        assert torch.equal(tiny_model.encode_image(photos, decode_workers=workers), exact)


def test_thread_plan_decodes_between_batches_on_cpu_and_ahead_on_a_gpu() -> None:
    assert ThreadPlan.for_device("cpu", 2) == ThreadPlan(decode_workers=2, overlap=False)
    assert ThreadPlan.for_device("cuda", 16) == ThreadPlan(decode_workers=15, overlap=True)
    assert ThreadPlan.for_device("cuda", 1) == ThreadPlan(decode_workers=1, overlap=True)


FAULTS_PER_ROUND = """
import itertools, resource, sys, torch, clipserve

sizes = itertools.count(4 << 20, 4096)  # floats; every round a little larger, as batch shapes vary

def faults_per_round() -> float:
    faults = []
    for _ in range(8):  # 3 blocks of activations (16 MiB and up) allocated, touched and freed
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(next(sizes)).fill_(1.0) for _ in range(3)]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return sum(faults[4:]) / 4  # once the heap has settled

before = faults_per_round()
clipserve.load(sys.argv[1], precision="fp32")
print(before, faults_per_round())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator: Linux only")
def test_loading_on_cpu_keeps_freed_memory_for_the_next_batch(tiny_checkpoint: Path) -> None:
    """In a fresh process (the setting is process-wide): glibc returns freed activations to the OS and faults
    them in again on the next allocation, until `load` has it keep them (`retain_freed_memory`)."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ROUND, str(tiny_checkpoint)], capture_output=True, text=True, check=True
    )
    before, after = map(float, out.stdout.split())
    assert before > 10_000  # each block larger than glibc's dynamic mmap threshold: mapped, faulted, unmapped
    assert after < 500  # the heap grows by the few new pages only


def test_uint8_buffer_is_written_in_place(tiny_model, photos: list[bytes]) -> None:
    pool = DecodePool(tiny_model.preprocessor, workers=1)
    batch = pool.decode(photos[:1])
    pool.close()
    assert batch.dtype == torch.uint8 and batch.shape == (1, 32, 32, 3)
    expected = tiny_model.preprocessor.to_uint8(Image.open(io.BytesIO(photos[0])))
    assert np.array_equal(batch[0].numpy(), expected)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "--task", "zeroshot_classification", "--dataset", "x"], "fp32"),  # reproduces published numbers
        (["embed", "tiny", "--text", "a"], "auto"),
        (["embed-dataset", "in", "--model", "tiny", "--output", "out"], "auto"),
        (["embed-dataset", "in", "--model", "tiny", "--output", "out", "--precision", "int8"], "int8"),
    ],
)
def test_command_precision_defaults(argv: list[str], expected: str) -> None:
    from clipserve.cli.main import build_parser

    assert build_parser().parse_args(argv).precision == expected
