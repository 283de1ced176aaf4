"""Shared helpers for the server tests (no tests here): images, settings, a live uvicorn server."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image

from clipserve.api import AuthSettings, ServerSettings, create_app
from clipserve.api.settings import ModelSpec
from clipserve.engine.batching import BatchSettings

API_KEY = "test-api-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "tiny"


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photos() -> list[bytes]:
    """Real photographs from scikit-image, as PNG and JPEG bytes."""
    from skimage import data

    return [encode(data.astronaut()), encode(data.chelsea(), "JPEG"), encode(data.coffee(), "JPEG"),
            encode(data.camera())]


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def settings_for(tmp_path: Path, **overrides: Any) -> ServerSettings:
    base = ServerSettings(
        models=(ModelSpec("unused", MODEL),),
        state_dir=tmp_path / "state",
        auth=AuthSettings(api_keys=(API_KEY,), admin_key=ADMIN_KEY),
        batching=BatchSettings(max_batch_size=16, max_wait_ms=2.0, max_queue=256),
        preprocess_workers=2,
    )
    return replace(base, **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(settings: ServerSettings, models: dict) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a background thread; yields its base URL."""
    port = free_port()
    app = create_app(replace(settings, port=port), models)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
