"""Every error status, in OpenAI's shape: 400, 401, 403, 404, 413, 422, 429, 503, 504."""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_server_support import ADMIN, AUTH, MODEL, data_url, encode, settings_for

from clipserve.api import create_app
from clipserve.api.settings import Limits, ModelSpec
from clipserve.engine.batching import BatchSettings


@pytest.fixture(scope="module")
def png() -> bytes:
    from PIL import Image

    return encode(Image.new("RGB", (40, 30), (200, 30, 60)))


def make_client(tiny_model, tmp_path: Path, **overrides) -> TestClient:
    return TestClient(create_app(settings_for(tmp_path, **overrides), {MODEL: tiny_model}),
                      raise_server_exceptions=False)


@pytest.fixture
def client(tiny_model, tmp_path: Path):
    with make_client(tiny_model, tmp_path) as c:
        yield c


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG whose header claims width x height pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def embed(client: TestClient, payload, **extra):
    return client.post("/v1/embeddings", json={"model": MODEL, "input": payload, **extra}, headers=AUTH)


# -- 400 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "extra", "param", "code"),
    [
        (["ok", {"image": "%%% not base64 %%%"}], {}, "input[1]", "invalid_input"),
        (["ok", "data:text/plain;base64,aGVsbG8="], {}, "input[1]", "invalid_input"),
        (["ok", "data:image/png,rawbytes"], {}, "input[1]", "invalid_input"),
        (["ok", "   "], {}, "input[1]", "invalid_input"),
        ([[1, 2, 3]], {}, "input[0]", "invalid_input"),
        ("ok", {"dimensions": 3}, "dimensions", "unsupported_dimensions"),
        (["aGVsbG8=", "https://example.com/cat.png"], {"modality": "image"}, "input[1]", "url_refused"),
        ([], {}, "input", "invalid_input"),
    ],
)
def test_bad_embedding_inputs_are_400_naming_the_item(client, payload, extra, param, code) -> None:
    assert_error(embed(client, payload, **extra), 400, param, code)


def test_corrupt_image_is_400_naming_its_index(client, png: bytes) -> None:
    error = assert_error(embed(client, ["text", data_url(png), data_url(png[:40])]), 400, "input[2]", "invalid_image")
    assert "input[2]" in error["message"]


def test_decompression_bomb_is_refused_before_decoding(client) -> None:
    start = time.perf_counter()
    error = assert_error(embed(client, [{"image": data_url(bomb_png())}]), 400, "input[0]", "invalid_image")
    assert "pixels" in error["message"]
    assert time.perf_counter() - start < 5  # refused from the header, 10^10 pixels never decoded


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "text-not-image", "labels": ["a", "b"]}, "input"),
        ({"input": "x", "labels": ["a", "a"]}, "labels[1]"),
        ({"input": "x", "labels": ["a", " "]}, "labels[1]"),
        ({"input": "x", "labels": ["a"], "templates": ["no placeholder"]}, "templates[0]"),
        ({"input": "x", "labels": ["a"], "templates": ["{} and {}"]}, "templates[0]"),
        ({"input": "x", "labels": ["a"], "templates": []}, "templates"),
    ],
)
def test_bad_classification_requests_are_400(client, png: bytes, body: dict, param: str) -> None:
    body = {**body, "model": MODEL}
    if body["input"] == "x":
        body["input"] = data_url(png)
    assert_error(client.post("/v1/classifications", json=body, headers=AUTH), 400, param)


# -- 401, 403, 404 -------------------------------------------------------------------------------------


def test_auth_errors(client) -> None:
    missing = client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert_error(missing, 401, code="invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/v1/embeddings", json={"model": MODEL, "input": "x"},
                             headers={"Authorization": "Bearer cs-000000000000-nope"}), 401)
    assert_error(client.get("/admin/keys", headers=AUTH), 403, code="admin_only")


def test_unknown_model_and_route_are_404(client) -> None:
    missing = client.post("/v1/embeddings", json={"model": "missing", "input": "x"}, headers=AUTH)
    assert_error(missing, 404, "model", "model_not_found")
    assert_error(client.get("/v1/nothing-here", headers=AUTH), 404)
    assert_error(client.delete("/admin/models/missing", headers=ADMIN), 404, code="model_not_found")


# -- 413 -----------------------------------------------------------------------------------------------


def test_body_over_the_cap_is_413(tiny_model, tmp_path: Path) -> None:
    limits = Limits(max_body_bytes=2000)
    with make_client(tiny_model, tmp_path, limits=limits) as client:
        assert_error(embed(client, ["x" * 3000]), 413, code="body_too_large")

        def chunks():  # no Content-Length: the cap applies while streaming
            for _ in range(10):
                yield b" " * 500

        streamed = client.post("/v1/embeddings", content=chunks(),
                               headers={**AUTH, "Content-Type": "application/json"})
        assert_error(streamed, 413, code="body_too_large")


def test_image_bytes_and_item_count_over_caps_are_413(tiny_model, tmp_path: Path, png: bytes) -> None:
    limits = Limits(max_image_bytes=len(png) - 1, max_items=3)
    with make_client(tiny_model, tmp_path, limits=limits) as client:
        assert_error(embed(client, ["a", data_url(png)]), 413, "input[1]", "image_too_large")
        assert_error(embed(client, ["a", "b", "c", "d"]), 413, "input", "too_many_items")
        upload = client.post("/v1/embeddings/upload", data={"model": MODEL},
                             files=[("files", ("a.png", png, "image/png"))], headers=AUTH)
        assert_error(upload, 413, "files[0]", "image_too_large")


# -- 422 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": MODEL, "input": {"image": 3}}, None),
    ],
)
def test_schema_errors_are_422_in_openai_shape(client, body: dict, param: str | None) -> None:
    error = assert_error(client.post("/v1/embeddings", json=body, headers=AUTH), 422, code="validation_error")
    if param is not None:
        assert error["param"] == param


def test_malformed_json_is_422(client) -> None:
    response = client.post("/v1/embeddings", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 422)


# -- 429, 503, 504 -------------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(tiny_model, tmp_path: Path) -> None:
    batching = BatchSettings(max_batch_size=1, max_wait_ms=0, max_queue=1)
    with make_client(tiny_model, tmp_path, batching=batching) as client:
        response = embed(client, ["a", "b"])
        assert_error(response, 429, code="queue_full")
        assert int(response.headers["retry-after"]) >= 1
        assert embed(client, ["a"]).status_code == 200


def test_model_that_failed_to_load_is_503_and_not_ready(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, models=(ModelSpec(str(tmp_path / "no-such-checkpoint"), "broken"),))
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while (ready := client.get("/ready")).json()["models"]["broken"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and "failed to load" in ready.json()["models"]["broken"]
        response = client.post("/v1/embeddings", json={"model": "broken", "input": "x"}, headers=AUTH)
        assert_error(response, 503, "model", "model_not_ready")
        assert client.get("/health").status_code == 200


def test_slow_inference_hits_the_request_timeout_504(tiny_model, tmp_path: Path) -> None:
    with make_client(tiny_model, tmp_path, limits=Limits(request_timeout_s=0.2)) as client:
        batched = client.app.state.server.pool.get(MODEL).batched
        original = batched.texts._run

        def slow(rows):
            time.sleep(1.0)
            return original(rows)

        batched.texts._run = slow
        try:
            assert_error(embed(client, "x"), 504, code="timeout")
        finally:
            batched.texts._run = original
        time.sleep(1.0)
        assert embed(client, "x").status_code == 200


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_items"):
        Limits(max_items=0)
    with pytest.raises(ValueError, match="port"):
        replace(settings_for(tmp_path), port=70000)
    with pytest.raises(ValueError, match="alias"):
        ModelSpec("x", "bad alias with spaces")
