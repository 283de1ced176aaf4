"""Turning request items into texts and image bytes, with 4xx errors that name the item.

Accepted forms (one embedding per item, in order):

* a string: text, except a data URL (``data:image/...;base64,...``), which is an image. With
  ``modality="image"`` every string is an image: a data URL, raw base64, or an http(s) URL; with
  ``modality="text"`` every string is text;
* ``{"image": ...}`` (data URL, raw base64 or URL) and ``{"text": ...}``;
* chat content parts ``{"type": "image_url", "image_url": {"url": ...}}`` (data URL or URL) and
  ``{"type": "text", "text": ...}``.

URLs are fetched only as `clipserve.io.fetch` allows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from clipserve.api.errors import APIError
from clipserve.api.schemas import ImageObject, ImageURLPart, TextObject, TextPart
from clipserve.io.fetch import FetchError, FetchPolicy, fetch_url


@dataclass(frozen=True)
class TextItem:
    index: int
    text: str


@dataclass(frozen=True)
class ImageItem:
    """Image bytes, or a URL still to fetch."""

    index: int
    data: bytes | None = None
    url: str | None = None


Item = TextItem | ImageItem


def _bad(param: str, message: str, code: str = "invalid_input") -> APIError:
    return APIError(400, message, param=param, code=code)


def _decode_base64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(param, f"{param}: not valid base64") from None


def image_from_string(value: str, index: int, param: str, *, raw_base64: bool) -> ImageItem:
    """A data URL, an http(s) URL, or (when `raw_base64`) bare base64."""
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma:
            raise _bad(param, f"{param}: malformed data URL (no comma)")
        media, *params = header[5:].split(";")
        if "base64" not in params:
            raise _bad(param, f"{param}: data URLs must be base64-encoded (data:image/png;base64,...)")
        if media and not media.lower().startswith("image/"):
            raise _bad(param, f"{param}: data URL media type {media!r} is not an image")
        return ImageItem(index, data=_decode_base64(payload, param))
    if value.startswith(("http://", "https://")):
        return ImageItem(index, url=value)
    if raw_base64:
        return ImageItem(index, data=_decode_base64(value, param))
    raise _bad(param, f"{param}: expected a data URL (data:image/...;base64,...) or an http(s) URL")


def _text(text: str, index: int, param: str) -> TextItem:
    if not text.strip():
        raise _bad(param, f"{param}: empty text")
    return TextItem(index, text)


def parse_item(value: object, index: int, param: str, modality: str | None = None) -> Item:
    """One request item; `param` is how errors name it (e.g. ``input[3]``)."""
    if isinstance(value, str):
        if modality == "image":
            return image_from_string(value, index, param, raw_base64=True)
        if modality is None and value.startswith("data:"):
            return image_from_string(value, index, param, raw_base64=False)
        return _text(value, index, param)
    if isinstance(value, ImageObject):
        return image_from_string(value.image, index, param, raw_base64=True)
    if isinstance(value, ImageURLPart):
        url = value.image_url if isinstance(value.image_url, str) else value.image_url.url
        return image_from_string(url, index, param, raw_base64=False)
    if isinstance(value, (TextObject, TextPart)):
        return _text(value.text, index, param)
    if isinstance(value, (int, list)):
        raise _bad(param, f"{param}: token-id input is not supported (ids depend on the tokenizer); send text")
    raise _bad(param, f"{param}: unsupported input item")


def parse_items(values: object, name: str, modality: str | None = None) -> list[Item]:
    """A single value or a list of them."""
    if not isinstance(values, list):
        return [parse_item(values, 0, name, modality)]
    if not values:
        raise _bad(name, f"{name}: empty list")
    return [parse_item(v, i, f"{name}[{i}]", modality) for i, v in enumerate(values)]


async def image_bytes(
    items: Sequence[ImageItem], names: Sequence[str], policy: FetchPolicy, max_bytes: int
) -> list[bytes]:
    """Each image's bytes, fetching URLs concurrently; 400 for a refused URL, 413 above `max_bytes`."""

    async def one(item: ImageItem, param: str) -> bytes:
        if item.data is not None:
            data = item.data
        else:
            assert item.url is not None
            try:
                data = await fetch_url(item.url, policy)
            except FetchError as exc:
                raise _bad(param, f"{param}: {exc}", code="url_refused") from None
        if len(data) > max_bytes:
            raise APIError(
                413, f"{param}: image is {len(data)} bytes, limit {max_bytes}", param=param, code="image_too_large"
            )
        return data

    return list(await asyncio.gather(*(one(item, p) for item, p in zip(items, names, strict=True))))
