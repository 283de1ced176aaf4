"""`clipserve demo`: the API and the browser playground on loopback, fully offline, in one command.

Trains the digits CLIP (`clipserve.train.digits`; reused from the cache after the first run), fills a
`demo` collection with the held-out digits and the photographs bundled with scikit-image, and serves both
with a fresh API key, printing the URL and the key.
"""

from __future__ import annotations

import argparse
import base64
import io
import secrets
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipserve.cli.main import CLIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from clipserve.collections import Collection, CollectionStore, Source
    from clipserve.engine.model import Model

MODEL_ALIAS = "digits"
COLLECTION = "demo"
# scikit-image's bundled photographs (no download needed); its synthetic images are left out.
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
THUMBNAIL_PX = 160


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small model offline and serve it with the browser playground",
        description="Train (or reuse) the digits CLIP, fill a demo collection with held-out digits and "
        "scikit-image's photos, and serve the API and the playground with a fresh API key. "
        "No network needed.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the trained model, the demo collection and the key database live "
        "(default: $CLIPSERVE_CACHE or ~/.cache/clipserve)",
    )
    p.set_defaults(func=run)


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def demo_sources() -> list[Source]:
    """The held-out digits (8x8 PNGs) and scikit-image's photographs (JPEGs), each with its metadata and a
    thumbnail data URL for the playground."""
    import skimage.data
    from PIL import Image

    from clipserve.collections import Source
    from clipserve.train.digits import load_split

    heldout = load_split("heldout")
    sources = []
    for i, (image, label) in enumerate(zip(heldout.images, heldout.labels, strict=True)):
        png = _encoded(image, "PNG")
        sources.append(
            Source(
                data=png,
                name=f"digits/heldout/{i:03d}.png",
                metadata={
                    "dataset": "scikit-learn digits (held out)",
                    "label": label,
                    "thumbnail": _data_url(png, "image/png"),
                },
            )
        )
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        thumbnail = photo.copy()
        thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        sources.append(
            Source(
                data=_encoded(photo, "JPEG"),
                name=f"scikit-image/{name}.jpg",
                metadata={
                    "dataset": "scikit-image",
                    "name": name,
                    "thumbnail": _data_url(_encoded(thumbnail, "JPEG"), "image/jpeg"),
                },
            )
        )
    return sources


def fill_demo_collection(store: CollectionStore, model: Model, checkpoint: Path) -> Collection:
    """The `demo` collection for `model`, filled. Re-running adds only what is missing (ingest skips stored
    content before embedding it); a collection made with another model (an older recipe) is made anew."""
    from clipserve.collections import ingest, manifest_for

    if COLLECTION in store.names() and store.open(COLLECTION).manifest.model_name != model.info.name:
        store.drop(COLLECTION)
    if COLLECTION not in store.names():
        store.create(manifest_for(COLLECTION, model, str(checkpoint)))
    collection = store.open(COLLECTION)
    report = ingest(collection, model, demo_sources())
    problems = [s for s in report.skipped if s.reason != "duplicate"]
    if problems:
        raise CLIError(
            f"cannot add {problems[0].source} to the demo collection: {problems[0].reason} "
            f"({problems[0].detail})",
            code=1,
        )
    collection.save_index()
    return collection


def demo_app(
    checkpoint: Path, model: Model, store: CollectionStore, api_key: str, state_dir: Path
) -> FastAPI:
    """The server for the demo: the digits model as `digits`, the collections in `store`, one static key."""
    from clipserve.api import AuthSettings, ModelSpec, ServerSettings, create_app

    settings = ServerSettings(
        models=(ModelSpec(str(checkpoint), MODEL_ALIAS),),
        state_dir=state_dir,
        auth=AuthSettings(api_keys=(api_key,)),
    )
    app = create_app(settings, {MODEL_ALIAS: model})
    app.state.collections = store
    return app


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before any training, if the address is taken (uvicorn would fail only after)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise CLIError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port"
        ) from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from clipserve.collections import CollectionStore
    from clipserve.engine.loading import load
    from clipserve.train.digits import cache_root, cached_digits_model

    cache: Path = args.cache or cache_root()
    _check_port(args.host, args.port)
    print(
        f"clipserve demo: the digits model in {cache} (trained on first use: minutes on a CPU)",
        file=sys.stderr,
        flush=True,
    )
    checkpoint = cached_digits_model(cache)
    model = load(str(checkpoint))
    store = CollectionStore(cache / "demo-collections")
    collection = fill_demo_collection(store, model, checkpoint)
    print(f"clipserve demo: collection {COLLECTION!r} holds {collection.count()} items", file=sys.stderr)
    api_key = secrets.token_urlsafe(24)
    app = demo_app(checkpoint, model, store, api_key, cache / "demo-state")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"\n  Playground: http://{host}:{args.port}/\n  API key:    {api_key}\n  Model:      {MODEL_ALIAS}"
        f"\n  (Ctrl+C stops the server)\n",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    finally:
        store.close()
    return 0
