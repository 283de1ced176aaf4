"""Image decoding and CLIP preprocessing that reproduces open_clip 3.3.0's eval transform without torchvision.

Why this exists: the served embeddings must be the ones open_clip computes, so preprocessing has to match
``open_clip.image_transform(size, is_train=False)`` exactly (max-abs 0 in practice, asserted <= 1e-6), while
the product must not depend on torchvision. The pipeline is therefore a transcription of torchvision 0.28's
PIL code path, step by step, with the same arithmetic:

1. Resize. ``"shortest"``: short side -> ``size``, long side -> ``int(size * long / short)`` (truncation,
   as torchvision's ``_compute_resized_output_size``); ``"squash"``: both sides -> ``size``. An image that
   already has the target size is left untouched. The resize is PIL's ``img.resize((w, h), BICUBIC or
   BILINEAR)`` in the image's own mode, exactly what torchvision calls: PIL itself forces NEAREST for
   "1"/"P" and resizes "RGBA"/"LA" premultiplied.
2. Center crop (``"shortest"`` only) with torchvision's offsets ``int(round((h - size) / 2.0))`` (Python
   banker's rounding: 225 -> 0, 227 -> 2). An image smaller than the crop is first zero-padded the way
   torchvision does (left/top get ``(size - w) // 2``). With ``"shortest"`` resizing this never happens, but
   the helper is exact on its own.
3. ``convert("RGB")`` *after* resize and crop, so palette and alpha images are resampled in their own mode.
4. uint8 HWC -> float32 CHW, ``/ 255``, then in place ``sub_(mean).div_(std)`` with float32 mean/std (the
   order and dtypes of torchvision's ``to_tensor`` + ``normalize``, hence bit-identical results).

Modes open_clip would mangle or reject are normalised *before* step 1 (documented deviations, by design):

* 16-bit and 32-bit integer grayscale ("I;16", "I;16L", "I;16B", "I;16N", "I"): PIL's ``convert("RGB")``
  clips these to 255, turning most 16-bit images white. Samples are taken as 16-bit, clipped to
  [0, 65535] and mapped to 8 bits with ``round(v / 257)`` (= ``(v + 128) // 257``), which is the exact
  inverse of the usual 8 -> 16 bit expansion ``v * 257``, so an 8-bit image saved as 16-bit comes back
  unchanged. "I" (int32) is read as 16-bit samples because that is what PIL's decoders put in it.
* 32-bit float grayscale ("F"): NaN -> 0; if every finite sample lies in [0, 1] the image is taken as a
  [0, 1] image (numpy/scikit-image convention) and scaled by 255, otherwise as PIL's own 0..255 scale
  (e.g. ``L.convert("F")``); then rounded and clipped to uint8.
* "La" (premultiplied luminance+alpha; PIL cannot convert it to RGB) -> "LA" first.
* "PA" (palette+alpha; PIL would bicubic-interpolate palette *indices*) -> "RGBA" first.

Everything else that PIL can convert to RGB ("1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "LA", "CMYK",
"YCbCr", "LAB", "HSV") goes through the open_clip pipeline as is, so it matches open_clip exactly; in
particular CMYK is resized in CMYK and converted with PIL's (profile-less) formula, and alpha is dropped,
not composited, as open_clip does.

The fast path (``Preprocessor.decode(fast=True)``, ``resize_crop``) is the documented exception to exactness:
JPEG draft decoding and torch's antialiased resize in RGB, on any device, with the same geometry.

Decoding (``open_image``) refuses oversized inputs *before* pixels are decoded (byte size, then the header's
width x height), decodes fully, takes the first frame of animated/multi-frame files, applies the EXIF
orientation, and turns every decoder failure into one-line ``ImageError``s, because images arrive from
untrusted clients and a server must answer 4xx, not crash. Only common raster formats are accepted
(``ALLOWED_FORMATS``): Pillow's exotic plugins (EPS runs Ghostscript, for example) are not exposed to uploads.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipserve.config import PreprocessConfig

ImageInput = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

# Pillow format ids accepted by `open_image`, tried in this order ("JPEG" also opens MPO files); ids whose
# plugin is not available in the installed Pillow are skipped.
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "ICO", "TGA", "AVIF", "JPEG2000",
)  # fmt: skip

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")
# Modes whose open_clip path (resize in mode, convert("RGB")) is sound and therefore reproduced as is.
_NATIVE_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "LA", "CMYK", "YCbCr", "LAB", "HSV"})
_MAX_PATH_IN_MESSAGE = 200


class ImageError(ValueError):
    """An input that is not a usable image; the message is one readable line meant for the client."""


@dataclass(frozen=True)
class ImageLimits:
    """Refusal thresholds for untrusted images, checked before any pixel is decoded.

    ``max_pixels`` guards against decompression bombs (a few KB of PNG can declare 10^10 pixels). Pillow's
    global ``Image.MAX_IMAGE_PIXELS`` bomb check still applies on top of it (it errors above twice that value,
    ~179 MP by default), so raising ``max_pixels`` beyond that also needs Pillow's global raised.
    """

    max_bytes: int = 50 * 2**20
    max_pixels: int = 64_000_000


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _short(path: str) -> str:
    """A path fit for a one-line message: control characters replaced, long paths cut."""
    path = "".join(c if c.isprintable() else "?" for c in path)
    return path if len(path) <= _MAX_PATH_IN_MESSAGE else path[:_MAX_PATH_IN_MESSAGE] + "..."


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"empty image: {w}x{h} pixels")
    if w * h > limits.max_pixels:
        raise ImageError(f"too many pixels: {w}x{h} = {w * h} > limit {limits.max_pixels}")


def _check_bytes(n: int, limits: ImageLimits) -> None:
    if n == 0:
        raise ImageError("empty input: 0 bytes")
    if n > limits.max_bytes:
        raise ImageError(f"too large: {n} bytes > limit {limits.max_bytes}")


def _apply_exif_orientation(img: Image.Image, in_place: bool) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag; a copy only when a transposition is needed.

    A broken EXIF block must not cost the user a perfectly decodable photo, so EXIF parse errors are ignored
    (the image is used as stored).
    """
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    try:
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


@functools.cache
def _open_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format id that no loaded plugin registers, so filter once.
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _decode(fp: IO[bytes], limits: ImageLimits, draft_size: int | None) -> Image.Image:
    try:
        img = Image.open(fp, formats=_open_formats())
    except UnidentifiedImageError:
        raise ImageError("not an image: unrecognised or unsupported format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels: {_one_line(exc)}") from None
    except Exception as exc:  # plugins raise SyntaxError, struct.error, EOFError, ...
        raise ImageError(f"corrupt image header: {_one_line(exc)}") from None
    _check_pixels(img.size, limits)
    try:
        if draft_size is not None:
            # JPEG only (a no-op elsewhere): DCT-domain downscale by 1/2, 1/4 or 1/8 while both sides stay
            # >= draft_size, so the later shortest-side resize still downsamples.
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels: {_one_line(exc)}") from None
    except MemoryError:
        raise ImageError("image too large to decode (out of memory)") from None
    except Exception as exc:
        msg = _one_line(exc)
        if "truncated" in msg.lower():
            raise ImageError(f"truncated image: {msg}") from None
        raise ImageError(f"corrupt image data: {msg}") from None
    return _apply_exif_orientation(img, in_place=True)


def open_image(
    source: ImageInput, limits: ImageLimits = ImageLimits(), *, draft_size: int | None = None
) -> Image.Image:
    """Decode an untrusted image fully, first frame only, with its EXIF orientation applied.

    Limits are enforced before decoding pixels (byte size first, then the header's pixel count), and every
    failure is an ``ImageError`` with one readable line, so a server can answer 4xx without a traceback.

    ``draft_size``: optional fast decode for JPEG (``Image.draft``): decode at 1/2, 1/4 or 1/8 scale but never
    below ``draft_size`` on the shortest side; pass the preprocessing size. ``None`` (default) decodes at full
    resolution, which is the path that is exact w.r.t. open_clip.

    An already-open ``PIL.Image`` is checked against ``max_pixels``, drafted if still lazy, loaded and
    EXIF-transposed (into a new image only when a transposition is needed; the caller's object is otherwise
    returned as is). A wrong argument type raises ``TypeError`` (a programming error, not a bad image).
    """
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size <= 0):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, limits)
        try:
            if draft_size is not None and isinstance(source, ImageFile.ImageFile) and source.tile:
                source.draft("RGB", (draft_size, draft_size))
            source.load()
        except MemoryError:
            raise ImageError("image too large to decode (out of memory)") from None
        except Exception as exc:
            msg = _one_line(exc)
            kind = "truncated image" if "truncated" in msg.lower() else "corrupt image data"
            raise ImageError(f"{kind}: {msg}") from None
        return _apply_exif_orientation(source, in_place=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        _check_bytes(view.nbytes, limits)
        data = (
            source if isinstance(source, bytes) else (view.cast("B") if view.c_contiguous else view.tobytes())
        )
        return _decode(io.BytesIO(data), limits, draft_size)
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        try:
            f = open(path, "rb")  # closed by the `with` below
        except FileNotFoundError:
            raise ImageError(f"file not found: {_short(path)}") from None
        except IsADirectoryError:
            raise ImageError(f"not a file: {_short(path)}") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            reason = getattr(exc, "strerror", None) or _one_line(exc)
            raise ImageError(f"cannot read file: {_short(path)}: {reason}") from None
        with f:
            try:
                _check_bytes(os.fstat(f.fileno()).st_size, limits)
                return _decode(f, limits, draft_size)
            except ImageError as exc:  # say which file: a batch of paths is otherwise hard to debug
                raise ImageError(f"{_short(path)}: {exc}") from None
    raise TypeError(f"expected a PIL image, a path or bytes, got {type(source).__name__}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring modes that open_clip would clip, mangle or reject into an 8-bit mode (rules in module doc)."""
    mode = img.mode
    if mode in _NATIVE_MODES:
        return img
    if mode == "La":
        return img.convert("LA")
    if mode == "PA":
        return img.convert("RGBA")
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(img)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ImageError(f"unsupported image mode {mode!r}")
        wide = np.clip(arr.astype(np.int64, copy=False), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.where(np.isnan(arr), np.float32(0.0), arr)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * np.float32(255.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    raise ImageError(f"unsupported image mode {mode!r}")


def _checked_8bit(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ImageError(f"empty image: {image.width}x{image.height} pixels")
    return _to_8bit(image)


def _resizes_uint8(device: torch.device) -> bool:
    """Whether torch has an antialiased uint8 resize kernel on `device` (CPU only; CUDA resizes floats)."""
    return device.type == "cpu"


def resized_size(width: int, height: int, size: int, resize_mode: str = "shortest") -> tuple[int, int]:
    """(w, h) after torchvision's Resize(size) ("shortest", truncating) or Resize((size, size)) ("squash")."""
    if resize_mode == "squash":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``F.center_crop(img, [size, size])`` on a PIL image: zero-pad if smaller, then crop."""
    w, h = img.size
    if size > w or size > h:
        pad_l = (size - w) // 2 if size > w else 0
        pad_t = (size - h) // 2 if size > h else 0
        pad_r = (size - w + 1) // 2 if size > w else 0
        pad_b = (size - h + 1) // 2 if size > h else 0
        bands = len(img.getbands())
        fill = 0 if bands == 1 else (0,) * bands
        padded = ImageOps.expand(img, border=(pad_l, pad_t, pad_r, pad_b), fill=fill)
        if img.mode == "P":
            padded.putpalette(img.getpalette())
        img = padded
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class Preprocessor:
    """open_clip's eval transform for one ``PreprocessConfig``, as PIL + numpy + torch (no torchvision).

    ``__call__`` takes an already decoded PIL image (no EXIF handling: that is ``open_image``'s job, exactly
    as open_clip's transform does not do it either); ``batch`` decodes any ``ImageInput`` with ``open_image``.
    """

    def __init__(self, cfg: PreprocessConfig) -> None:
        if not isinstance(cfg.size, int) or cfg.size <= 0:
            raise ValueError(f"size must be a positive int, got {cfg.size!r}")
        if cfg.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {cfg.interpolation!r}")
        if cfg.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {cfg.resize_mode!r}")
        self.cfg = cfg
        self.size = cfg.size
        self._resample = _RESAMPLE[cfg.interpolation]
        # float32 like torchvision's `torch.as_tensor(mean, dtype=tensor.dtype)`, shaped to broadcast on CHW.
        self._mean = torch.as_tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.as_tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
        if self._mean.numel() != 3 or self._std.numel() != 3:
            raise ValueError("mean and std must have 3 values")
        if (self._std == 0).any():
            raise ValueError(f"std has a zero in float32: {cfg.std!r}")

    def _rgb(self, image: Image.Image) -> Image.Image:
        """Resize, crop, convert("RGB"): the geometric half of the pipeline, in torchvision's order."""
        img = _checked_8bit(image)
        w, h = img.size
        new_w, new_h = resized_size(w, h, self.size, self.cfg.resize_mode)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self._resample)
        if self.cfg.resize_mode == "shortest":
            img = center_crop(img, self.size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img

    def _fill(self, out: torch.Tensor, image: Image.Image) -> None:
        """Write the RGB pixels of ``image`` as unnormalised floats (0..255) into ``out`` [3, S, S].

        One cast+transpose from PIL's buffer straight into the destination: no intermediate uint8 tensor
        (which would also trip torch's warning about PIL's read-only buffer).
        """
        hwc = np.asarray(self._rgb(image))
        out.numpy()[...] = hwc.transpose(2, 0, 1)

    def _normalise_(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision: to_tensor's `.div(255)`, then Normalize's `sub_(mean).div_(std)`; same ops, same order.
        return x.div_(255).sub_(self._mean).div_(self._std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """float32 [3, size, size], equal to open_clip's ``image_transform(size, is_train=False)(image)``."""
        out = torch.empty((3, self.size, self.size), dtype=torch.float32)
        self._fill(out, image)
        return self._normalise_(out)

    def batch(self, images: Sequence[ImageInput], limits: ImageLimits = ImageLimits()) -> torch.Tensor:
        """float32 [N, 3, size, size]; each item decoded by ``open_image`` (exact path, EXIF applied).

        Pixels are written straight into the batch tensor and normalised once for the whole batch. An
        ``ImageError`` names the failing item ("image 3: not an image: ...") so a client can find it.
        """
        out = torch.empty((len(images), 3, self.size, self.size), dtype=torch.float32)
        for i, source in enumerate(images):
            try:
                self._fill(out[i], open_image(source, limits))
            except ImageError as exc:
                raise ImageError(f"image {i}: {exc}") from None
        return self._normalise_(out)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """uint8 [size, size, 3] after resize/crop/RGB, before normalisation (for model-side normalising).

        ``(x / 255 - mean) / std`` of this array in float32 is exactly ``__call__``'s output. The array is a
        writable copy (PIL hands out read-only buffers).
        """
        return np.array(self._rgb(image))

    def decode(self, source: ImageInput, limits: ImageLimits = ImageLimits(), *, fast: bool = False) -> torch.Tensor:
        """Decode one image and resize/crop it: uint8 [S, S, 3], RGB, before normalisation.

        Exact (default): ``open_image`` + `to_uint8`, the open_clip pipeline. ``fast=True``: JPEGs decode at
        reduced size (``open_image(draft_size=S)``) and the resize is `resize_crop`'s (not bit-exact).
        """
        if not fast:
            return torch.from_numpy(self.to_uint8(open_image(source, limits)))
        return self.resize_crop(self.rgb_tensor(open_image(source, limits, draft_size=self.size)))

    def rgb_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 [H, W, 3] of ``image`` for `resize_crop` (fast path, any device): at its decoded size, except
        palette and 1-bit images, which come already resized by the exact path. open_clip resizes those with
        NEAREST (Pillow's rule for the two modes), which is cheap; a smooth resize of their colours would move
        their embeddings away from open_clip's."""
        img = _checked_8bit(image)
        if img.mode in ("P", "1"):
            return torch.from_numpy(self.to_uint8(img))
        return torch.from_numpy(np.array(img if img.mode == "RGB" else img.convert("RGB")))

    def resize_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Fast, approximate resize + centre crop of uint8 [H, W, 3] -> uint8 [S, S, 3], on ``pixels``' device.

        The same geometry as the exact path (`resized_size`, torchvision's crop offsets) with torch's
        antialiased resize instead of PIL's. On CPU that is torch's uint8 kernel, a port of Pillow's
        fixed-point resampler with a different weight precision: pixels differ by at most 1 from PIL's
        (asserted in tests), several times faster than Pillow's non-SIMD resize. Other devices (CUDA has no
        uint8 kernel) resize in float32 and round. The image is resized in RGB (alpha dropped first, where
        the exact path resizes RGBA premultiplied and drops it after: the same on opaque pixels).
        """
        if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
        height, width = pixels.shape[:2]
        new_w, new_h = resized_size(width, height, self.size, self.cfg.resize_mode)
        if (new_w, new_h) != (width, height):
            nchw = pixels.permute(2, 0, 1).unsqueeze(0)  # a channels-last view, which the uint8 kernel wants
            if not _resizes_uint8(pixels.device):
                nchw = nchw.float()
            nchw = F.interpolate(nchw, size=(new_h, new_w), mode=self.cfg.interpolation, antialias=True)
            if nchw.dtype != torch.uint8:
                nchw = nchw.round_().clamp_(0, 255).to(torch.uint8)
            pixels = nchw[0].permute(1, 2, 0)
        if self.cfg.resize_mode == "shortest":  # the resize leaves both sides >= size: a crop, never a pad
            top = int(round((new_h - self.size) / 2.0))
            left = int(round((new_w - self.size) / 2.0))
            pixels = pixels[top : top + self.size, left : left + self.size]
        return pixels


__all__ = [
    "ALLOWED_FORMATS",
    "ImageError",
    "ImageInput",
    "ImageLimits",
    "Preprocessor",
    "center_crop",
    "open_image",
    "resized_size",
]
