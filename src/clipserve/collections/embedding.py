"""What ties a collection to its model: compatibility checks, content hashes, query vectors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from clipserve.collections.store import CollectionError, Manifest
from clipserve.engine.model import Model
from clipserve.io.images import ImageInput, ImageLimits


def manifest_for(name: str, model: Model, model_source: str, dtype: str = "float32", index: str = "auto") -> Manifest:
    """The manifest of a new collection for `model`, loaded from `model_source` (a local path is made
    absolute, so that the collection reopens its model from any working directory)."""
    path = Path(model_source).expanduser()
    source = str(path.resolve()) if path.exists() else model_source
    return Manifest(name=name, model_source=source, model_name=model.info.name, embed_dim=model.embed_dim,
                    dtype=dtype, index=index)


def check_model(manifest: Manifest, model: Model) -> None:
    if model.embed_dim != manifest.embed_dim or model.info.name != manifest.model_name:
        raise CollectionError(
            f"collection {manifest.name!r} belongs to model {manifest.model_name!r} ({manifest.embed_dim}-d), "
            f"not {model.info.name!r} ({model.embed_dim}-d)"
        )


def image_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"image\0" + data).hexdigest()


def text_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(b"text\0" + text.encode("utf-8")).hexdigest()


def pair_hash(data: bytes, text: str) -> str:
    """An image with its caption: a different item from the same image alone or with another caption."""
    return "sha256:" + hashlib.sha256(b"both\0" + image_hash(data).encode() + b"\0" + text.encode("utf-8")).hexdigest()


def query_vector(
    model: Model,
    manifest: Manifest,
    *,
    text: str | None = None,
    image: ImageInput | None = None,
    vector: np.ndarray | list[float] | None = None,
    limits: ImageLimits = ImageLimits(),
) -> np.ndarray:
    """Exactly one of text, image (path, bytes or PIL) or raw vector -> a float32 [D] query vector."""
    given = [x is not None for x in (text, image, vector)]
    if sum(given) != 1:
        raise CollectionError("give exactly one of a text, an image or a vector to search with")
    if vector is not None:
        return np.asarray(vector, dtype=np.float32).reshape(-1)
    check_model(manifest, model)
    if text is not None:
        return model.encode_text([text], normalize=True)[0].numpy()
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()  # FileNotFoundError is a user error with the path in it
    return model.encode_image([image], normalize=True, limits=limits)[0].numpy()
