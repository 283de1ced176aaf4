"""clipserve.io.images against open_clip 3.3.0's eval transform (the oracle), on real photos.

The photos ship inside installed wheels (scikit-image, scikit-learn), so nothing is downloaded. Parity is
checked across geometries that hit every branch of torchvision's arithmetic (truncating resize, banker's
rounding in the center crop, no-op resize at exactly 224, up- and down-scaling) and across PIL modes.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import open_clip
from PIL import Image

from clipserve.config import PreprocessConfig
from clipserve.io.images import (
    ImageError,
    ImageLimits,
    Preprocessor,
    center_crop,
    open_image,
    resized_size,
)

torch.set_num_threads(1)

TOL = 1e-6
MAX_DIFF: dict[str, float] = {}  # worst max-abs per test group, printed at the end


def _record(group: str, diff: float) -> None:
    MAX_DIFF[group] = max(MAX_DIFF.get(group, 0.0), diff)


# --------------------------------------------------------------------------------------------- fixtures


@functools.cache
def _oc():
    return open_clip()


@functools.cache
def oc_transform(
    size: int = 224,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    mean: tuple | None = None,
    std: tuple | None = None,
):
    return _oc().image_transform(
        size, is_train=False, mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation
    )


PRE = Preprocessor(PreprocessConfig())


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _sklearn_images_dir() -> Path:
    import sklearn

    return Path(sklearn.__file__).parent / "datasets" / "images"


@functools.cache
def photo(name: str) -> Image.Image:
    """Real photos as PIL images (camera is natively grayscale "L")."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        index = [Path(f).name for f in data.filenames].index(f"{name}.jpg")
        return Image.fromarray(data.images[index])
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "china", "flower"]
JPEG_FILES = {
    "rocket.jpg": lambda: _skimage_dir() / "rocket.jpg",
    "china.jpg": lambda: _sklearn_images_dir() / "china.jpg",
    "flower.jpg": lambda: _sklearn_images_dir() / "flower.jpg",
}


@functools.cache
def geometry(name: str, geo: str) -> Image.Image:
    img = photo(name)
    w, h = img.size
    sizes = {
        "tiny_7x5": (7, 5), "tiny_1x1": (1, 1), "tiny_2x3": (2, 3), "landscape": (400, 150),
        "huge_3000x2000": (3000, 2000), "exact_224": (224, 224), "w224_h225": (224, 225),
        "w227_h224": (227, 224), "w224_h229": (224, 229), "s225": (225, 225), "s227": (227, 227),
        "w224_h500": (224, 500),
    }  # fmt: skip
    if geo == "original":
        return img
    if geo == "portrait":
        return img.transpose(Image.Transpose.TRANSPOSE) if w > h else img
    # BILINEAR for the 6 MP upscale (cheap); LANCZOS elsewhere, so downscaled inputs keep fine detail
    fast = geo.startswith("huge")
    return img.resize(sizes[geo], Image.Resampling.BILINEAR if fast else Image.Resampling.LANCZOS)


GEOMETRIES = [
    "original", "portrait", "landscape", "tiny_7x5", "tiny_1x1", "tiny_2x3", "huge_3000x2000", "exact_224",
    "w224_h225", "w227_h224", "w224_h229", "s225", "s227", "w224_h500",
]  # fmt: skip


def _with_alpha(img: Image.Image) -> Image.Image:
    """RGBA with a real alpha ramp (incl. fully transparent pixels), so premultiplied resizing matters."""
    rgba = img.convert("RGBA")
    w, h = rgba.size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 255 // max(1, w + h - 2)).astype(np.uint8)
    rgba.putalpha(Image.fromarray(ramp, "L"))
    return rgba


def in_mode(img: Image.Image, mode: str) -> Image.Image:
    rgb = img.convert("RGB")
    if mode == "P":
        return rgb.quantize(64)
    if mode == "RGBA":
        return _with_alpha(rgb)
    if mode == "LA":
        return _with_alpha(rgb).convert("LA")
    return rgb.convert(mode)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, group: str) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    _record(group, diff)
    assert diff <= TOL, f"{group}: max-abs {diff}"
    return diff


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("name", PHOTOS)
def test_parity_photos_geometries(name: str, geo: str) -> None:
    img = geometry(name, geo)
    assert_close(PRE(img), oc_transform()(img), "photos x geometries (RGB/L)")


MODES = ["L", "P", "RGBA", "LA", "CMYK", "1", "YCbCr", "RGBX", "HSV"]
MODE_GEOMETRIES = [
    "original",
    "portrait",
    "tiny_7x5",
    "tiny_1x1",
    "exact_224",
    "w227_h224",
    "w224_h229",
    "s225",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", PHOTOS)
def test_parity_modes(name: str, mode: str) -> None:
    """Modes open_clip handles natively: resized in their own mode, converted to RGB after the crop."""
    for geo in MODE_GEOMETRIES:
        img = in_mode(geometry(name, geo), mode)
        assert img.mode == mode
        assert_close(PRE(img), oc_transform()(img), f"modes ({mode})")


def test_parity_palette_with_transparency_and_huge_modes() -> None:
    for name in ("astronaut", "china"):
        pal = geometry(name, "original").convert("RGB").quantize(16)
        pal.info["transparency"] = 3
        assert_close(PRE(pal), oc_transform()(pal), "modes (P+transparency)")
        for mode in ("L", "RGBA", "P"):
            big = in_mode(geometry(name, "huge_3000x2000"), mode)
            assert_close(PRE(big), oc_transform()(big), f"modes ({mode}) huge")


CONFIGS = [
    dict(size=224, resize_mode="squash", interpolation="bicubic"),
    dict(size=224, resize_mode="squash", interpolation="bilinear"),
    dict(size=224, resize_mode="shortest", interpolation="bilinear"),
    dict(size=256, resize_mode="shortest", interpolation="bicubic"),
    dict(size=336, resize_mode="squash", interpolation="bilinear"),
    dict(size=384, resize_mode="shortest", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    dict(size=224, resize_mode="shortest", interpolation="bicubic",
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
]  # fmt: skip


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values())[:40])
def test_parity_other_configs(kw: dict) -> None:
    cfg = PreprocessConfig(**kw)
    pre = Preprocessor(cfg)
    ref = oc_transform(cfg.size, cfg.resize_mode, cfg.interpolation, kw.get("mean"), kw.get("std"))
    for name in ("chelsea", "camera", "flower"):
        for geo in ("original", "portrait", "tiny_7x5", "exact_224", "w227_h224", "s227"):
            for mode in ("RGB", "RGBA", "P"):
                img = in_mode(geometry(name, geo), mode)
                out = pre(img)
                assert out.shape == (3, cfg.size, cfg.size)
                assert_close(out, ref(img), f"configs ({cfg.resize_mode}/{cfg.interpolation}/{cfg.size})")


@pytest.mark.parametrize("fname", list(JPEG_FILES))
def test_parity_jpeg_files_through_open_image(fname: str) -> None:
    """The JPEG decode path (path, bytes, memoryview inputs) lands on the same pixels open_clip would see."""
    path = JPEG_FILES[fname]()
    with Image.open(path) as ref_img:
        ref_img.load()
        assert ref_img.getexif().get(0x0112, 1) == 1  # no orientation: open_image must not change anything
        ref = oc_transform()(ref_img)
    data = path.read_bytes()
    for source in (path, str(path), data, bytearray(data), memoryview(data)):
        assert_close(PRE(open_image(source)), ref, "JPEG files via open_image")


@pytest.mark.parametrize(
    "fmt,mode,kw",
    [("PNG", "RGBA", {}), ("WEBP", "RGB", {"lossless": True}), ("TIFF", "CMYK", {}), ("BMP", "RGB", {}),
     ("GIF", "P", {}), ("JPEG", "CMYK", {"quality": 90}), ("JPEG", "L", {"quality": 90})],
)  # fmt: skip
def test_parity_other_formats_through_open_image(fmt: str, mode: str, kw: dict) -> None:
    data = encode(in_mode(geometry("coffee", "original"), mode), fmt, **kw)
    with Image.open(io.BytesIO(data)) as ref_img:
        ref_img.load()
        assert ref_img.mode == mode
        ref = oc_transform()(ref_img)
    assert_close(PRE(open_image(data)), ref, "other formats via open_image")


def test_to_uint8_is_the_unnormalised_pipeline() -> None:
    for name in ("astronaut", "camera", "china"):
        for geo in ("original", "tiny_2x3", "w224_h229"):
            for mode in ("RGB", "RGBA", "P"):
                img = in_mode(geometry(name, geo), mode)
                u8 = PRE.to_uint8(img)
                assert u8.dtype == np.uint8 and u8.shape == (224, 224, 3) and u8.flags.writeable
                t = torch.from_numpy(u8).permute(2, 0, 1).float().div(255)
                t = t.sub(PRE._mean).div(PRE._std)
                assert torch.equal(t, PRE(img))


def test_output_layout() -> None:
    out = PRE(photo("chelsea"))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()


# --------------------------------------------------------------------------------------------- exotic modes


def _l_reference(l8: np.ndarray) -> torch.Tensor:
    return oc_transform()(Image.fromarray(l8, "L"))


@pytest.mark.parametrize("geo", ["original", "tiny_7x5", "w227_h224", "huge_3000x2000"])
def test_16bit_grayscale_scaled_to_8bit(geo: str) -> None:
    """open_clip clips 16-bit to 255 (a white image); we map v -> round(v / 257), exact inverse of v * 257."""
    cam = np.asarray(geometry("camera", geo))
    wide = cam.astype(np.uint16) * 257
    ref = _l_reference(cam)
    h, w = wide.shape
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2"), ("I", "=i4")):
        img = Image.frombytes(mode, (w, h), wide.astype(dtype).tobytes())
        assert img.mode == mode
        np.testing.assert_array_equal(np.asarray(img).astype(np.int64), wide)
        assert_close(PRE(img), ref, "16-bit -> 8-bit")
    # arbitrary 16-bit values: the rounding rule, and a PNG round trip through open_image
    rng = np.random.default_rng(0)
    noisy = np.clip(wide.astype(np.int64) + rng.integers(-128, 129, wide.shape), 0, 65535).astype(np.uint16)
    expected8 = ((noisy.astype(np.int64) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(expected8, np.rint(noisy / 257.0).astype(np.uint8))
    png = encode(Image.fromarray(noisy), "PNG")
    decoded = open_image(png)
    assert decoded.mode == "I;16"
    assert_close(PRE(decoded), _l_reference(expected8), "16-bit -> 8-bit")
    # open_clip itself on 16-bit data: almost everything saturates (why we do not follow it here)
    white = (1.0 - PRE._mean) / PRE._std
    assert ((oc_transform()(Image.fromarray(wide)) - white).abs() < 1e-5).float().mean() > 0.9


def test_int32_out_of_range_is_clipped() -> None:
    arr = np.array([[-5, 0, 70000], [65535, 257, 128]], dtype=np.int32)
    out = PRE.to_uint8(Image.fromarray(arr, "I").resize((224, 224), Image.Resampling.NEAREST))
    assert set(np.unique(out)) <= {0, 1, 255}


def test_float_grayscale() -> None:
    cam = np.asarray(photo("camera"))
    ref = _l_reference(cam)
    unit = Image.fromarray(cam.astype(np.float32) / np.float32(255.0), "F")  # [0, 1] convention
    assert_close(PRE(unit), ref, "F -> 8-bit")
    pil_scale = Image.fromarray(cam).convert("F")  # PIL's own 0..255 convention
    assert_close(PRE(pil_scale), ref, "F -> 8-bit")
    weird = np.array([[np.nan, -3.0, 1e9], [np.inf, -np.inf, 7.4]], dtype=np.float32)
    out = PRE.to_uint8(Image.fromarray(weird, "F").resize((224, 224), Image.Resampling.NEAREST))
    assert set(np.unique(out)) <= {0, 7, 255}


def test_la_premultiplied_and_palette_alpha() -> None:
    for name in ("astronaut", "coffee"):
        for geo in ("original", "tiny_7x5", "w224_h229"):
            la = in_mode(geometry(name, geo), "LA")
            assert_close(PRE(la.convert("La")), oc_transform()(la.convert("La").convert("LA")), "La / PA")
            pa = la.convert("RGBA").quantize(32).convert("PA")
            assert pa.mode == "PA"
            assert_close(PRE(pa), oc_transform()(pa.convert("RGBA")), "La / PA")


# ------------------------------------------------------------------------------------- geometry helpers


def test_resized_size_matches_torchvision() -> None:
    _oc()
    from torchvision.transforms.functional import _compute_resized_output_size

    rng = np.random.default_rng(1)
    for w, h in [(1, 1), (2, 3), (7, 5), (224, 224), (225, 224), (3000, 2000), (1, 10000), (10000, 1)] + [
        tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(2000)
    ]:
        for size in (224, 256, 336):
            h2, w2 = _compute_resized_output_size((h, w), [size])
            assert resized_size(w, h, size) == (w2, h2)
            assert resized_size(w, h, size, "squash") == (size, size)


def test_center_crop_pads_like_torchvision() -> None:
    _oc()
    from torchvision.transforms.functional import center_crop as tv_center_crop

    base = photo("coffee")
    for mode in ("RGB", "L", "P", "RGBA", "1"):
        for size in [(5, 5), (7, 12), (12, 7), (8, 8), (9, 10), (3, 20), (30, 31)]:
            img = in_mode(base.resize(size), mode)
            for crop in (8, 9):
                ours, ref = center_crop(img, crop), tv_center_crop(img, [crop, crop])
                assert ours.mode == ref.mode and ours.size == ref.size == (crop, crop)
                np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
                if mode == "P":
                    assert ours.getpalette() == ref.getpalette()


# --------------------------------------------------------------------------------------------- batch


def test_batch_mixed_inputs(tmp_path: Path) -> None:
    imgs = [geometry("astronaut", "original"), geometry("rocket", "tiny_7x5"), in_mode(photo("coffee"), "P")]
    png = encode(imgs[1], "PNG")
    path = tmp_path / "coffee.png"
    imgs[2].save(path)
    sources = [imgs[0], png, bytearray(png), memoryview(png), str(path), path]
    out = PRE.batch(sources)
    assert out.shape == (6, 3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    expected = [imgs[0], imgs[1], imgs[1], imgs[1], imgs[2], imgs[2]]
    for i, img in enumerate(expected):
        assert_close(out[i], oc_transform()(img), "batch")
    assert PRE.batch([]).shape == (0, 3, 224, 224)
    with pytest.raises(ImageError, match="^image 1: not an image"):
        PRE.batch([png, b"definitely not an image"])


def test_product_does_not_import_torchvision() -> None:
    src = Path(__file__).resolve().parent.parent / "src"
    code = "import sys, clipserve.io.images; sys.exit('torchvision' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_batch_applies_limits() -> None:
    png = encode(photo("chelsea"), "PNG")
    with pytest.raises(ImageError, match="too many pixels"):
        PRE.batch([png], ImageLimits(max_pixels=1000))


# --------------------------------------------------------------------------------------------- decoding


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_exif_orientation_is_applied() -> None:
    # 64x32, left half red, right half blue; orientation 6 = "rotate 90 CW to display"
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:, 2] = 255
    src = Image.fromarray(arr)
    data = encode(src, "JPEG", quality=95, exif=_exif_with_orientation(6))
    img = open_image(data)
    assert img.size == (32, 64)
    got = np.asarray(img.convert("RGB")).astype(int)
    assert got[:32, :, 0].mean() > 200 and got[32:, :, 2].mean() > 200  # red on top, blue at the bottom
    want = np.asarray(src.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(got - want).mean() < 8
    # a lazily opened PIL image: rotated into a new image, the caller's object left alone
    lazy = Image.open(io.BytesIO(data))
    rotated = open_image(lazy)
    assert rotated.size == (32, 64) and lazy.size == (64, 32)
    # no orientation tag: the very same object comes back, nothing copied
    plain = Image.open(io.BytesIO(encode(src, "JPEG")))
    assert open_image(plain) is plain


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    first = open_image(data)
    assert first.size == (40, 30)
    assert tuple(np.asarray(first.convert("RGB"))[5, 5]) == (255, 0, 0)
    # a real animated GIF shipped with scikit-image, through a path
    gif = _skimage_dir() / "no_time_for_that_tiny.gif"
    with Image.open(gif) as ref:
        assert ref.n_frames > 1
        ref.load()
        ref_out = oc_transform()(ref)
    assert_close(PRE(open_image(gif)), ref_out, "animated GIF first frame")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; its IDAT is a few bytes, so decoding it would fail."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding() -> None:
    for w, h in ((100_000, 100_000), (9_000, 9_000)):
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match="too many pixels") as err:
            open_image(_png_header_only(w, h))
        assert time.perf_counter() - t0 < 0.5  # nothing of that size was allocated or decoded
        assert "\n" not in str(err.value)
        print(f"\n  bomb {w}x{h}: {err.value}")
    # below the limit, the same kind of file gets as far as decoding: proves the refusal came first
    with pytest.raises(ImageError, match="truncated|corrupt"):
        open_image(_png_header_only(300, 200))
    with pytest.raises(ImageError, match="too many pixels: 300x200 = 60000 > limit 59999"):
        open_image(_png_header_only(300, 200), ImageLimits(max_pixels=59_999))
    with pytest.raises(ImageError, match="too many pixels"):
        open_image(Image.new("L", (300, 200)), ImageLimits(max_pixels=100))


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    jpeg = encode(photo("chelsea"), "JPEG", quality=90)
    png = encode(photo("chelsea"), "PNG")
    corrupt_png = png[:100] + bytes(b ^ 0x5A for b in png[100:4000]) + png[4000:]
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not an image\n")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    cases = {
        "truncated": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt": (corrupt_png, "corrupt|truncated"),
        "text bytes": (b"hello world", "not an image"),
        "text file": (text, "not an image"),
        "eps (format not allowed)": (eps, "not an image"),
        "missing path": (tmp_path / "nope.jpg", "file not found"),
        "nul in path": ("bad\0name.jpg", "cannot read file"),
        "directory": (tmp_path, "not a file"),
        "empty": (b"", "empty input"),
        "header only": (png[:40], "not an image|corrupt|truncated"),
    }
    for label, (source, pattern) in cases.items():
        with pytest.raises(ImageError, match=pattern) as err:
            open_image(source)
        msg = str(err.value)
        assert msg.isprintable() and 0 < len(msg) < 400, (label, msg)
        assert isinstance(err.value, ValueError)
        print(f"\n  {label}: {msg}")
    with pytest.raises(ImageError, match="too large: .* > limit 1000"):
        open_image(png, ImageLimits(max_bytes=1000))
    path = tmp_path / "big.png"
    path.write_bytes(png)
    with pytest.raises(ImageError, match="too large"):
        open_image(path, ImageLimits(max_bytes=1000))
    with pytest.raises(TypeError):
        open_image(12345)  # type: ignore[arg-type]


def test_huge_image_within_limits() -> None:
    big = geometry("china", "huge_3000x2000")
    data = encode(big, "JPEG", quality=90)
    img = open_image(data)
    assert img.size == (3000, 2000)
    assert_close(PRE(img), oc_transform()(img), "huge via open_image")


# --------------------------------------------------------------------------------------------- draft decode


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def test_draft_decode_close_to_exact_and_faster() -> None:
    print()
    worst = 1.0
    for name in PHOTOS:
        for geo in (
            ("original", "huge_3000x2000") if name in ("astronaut", "camera", "china") else ("original",)
        ):
            data = encode(geometry(name, geo).convert("RGB"), "JPEG", quality=95)
            exact_img = open_image(data)
            draft_img = open_image(data, draft_size=224)
            assert min(draft_img.size) >= 224
            assert draft_img.size[0] <= exact_img.size[0]
            cos = _cos(PRE(exact_img), PRE(draft_img))
            worst = min(worst, cos)
            print(f"  draft {name:9s} {geo:15s} {exact_img.size} -> {draft_img.size}: cos {cos:.6f}")
            assert cos > 0.99
    MAX_DIFF["draft worst cosine"] = worst

    src = geometry("china", "original").resize((1024, 768), Image.Resampling.LANCZOS)
    data = encode(src, "JPEG", quality=90)
    assert open_image(data, draft_size=224).size == (512, 384)

    def run(draft: int | None) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                PRE(open_image(data, draft_size=draft))
            best = min(best, (time.perf_counter() - t0) / 5)
        return best

    t_exact, t_draft = run(None), run(224)
    print(
        f"  1024x768 JPEG decode+preprocess: exact {t_exact * 1e3:.2f} ms, draft {t_draft * 1e3:.2f} ms, "
        f"speed-up x{t_exact / t_draft:.2f}"
    )


def test_preprocessor_rejects_bad_config() -> None:
    for kw in (
        dict(interpolation="lanczos"),
        dict(resize_mode="longest"),
        dict(size=0),
        dict(std=(1.0, 0.0, 1.0)),
    ):
        with pytest.raises(ValueError):
            Preprocessor(PreprocessConfig(**kw))


def test_zz_report_max_abs() -> None:
    """Prints the worst max-abs difference observed per group (run with -s to see it)."""
    print()
    for group, diff in sorted(MAX_DIFF.items()):
        print(f"  {group:40s} {diff:.3g}")
