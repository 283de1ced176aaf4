"""Auth on every route, keys hashed at rest, admin routes, rate limits, quotas, usage, runtime models."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route
from test_server_support import ADMIN, ADMIN_KEY, API_KEY, AUTH, MODEL, data_url, encode, settings_for

from clipserve.api import AuthSettings, create_app
from clipserve.api.auth import RateLimiter
from clipserve.api.ops import PUBLIC_PATHS


@pytest.fixture(scope="module")
def png() -> bytes:
    from PIL import Image

    return encode(Image.new("RGB", (20, 20), (0, 90, 200)))


@pytest.fixture
def client(tiny_model, tmp_path: Path):
    with TestClient(create_app(settings_for(tmp_path), {MODEL: tiny_model})) as c:
        yield c


def create_key(client: TestClient, **limits) -> tuple[str, str]:
    response = client.post("/admin/keys", json={"name": "tester", **limits}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()["key_id"], response.json()["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def routes_of(app) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route, descending into included routers (FastAPI includes lazily)."""

    def walk(routes):
        for route in routes:
            inner = getattr(route, "original_router", None)
            yield from walk(inner.routes) if inner is not None else [route]

    out = []
    for route in walk(app.routes):
        if isinstance(route, (APIRoute, Route)) and route.methods:
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            out.extend((method, path) for method in sorted(route.methods - {"HEAD"}))
    return out


def test_every_route_needs_a_key_except_probes(client: TestClient) -> None:
    routes = routes_of(client.app)
    assert len(routes) >= 15
    for method, path in routes:
        response = client.request(method, path)
        if path in PUBLIC_PATHS:
            assert response.status_code in (200, 503), (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["type"] == "authentication_error"
        if path.startswith("/admin"):
            assert client.request(method, path, headers=AUTH).status_code == 403, (method, path)
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == 200


def test_keys_are_stored_hashed_never_in_plain(client: TestClient, tmp_path: Path) -> None:
    key_id, key = create_key(client)
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=bearer(key)).status_code == 200
    secret = key.split("-", 2)[2]
    files = list((tmp_path / "state").iterdir())
    assert any(f.name.endswith(".sqlite3") for f in files)
    for f in files:  # the database and its WAL
        content = f.read_bytes()
        assert key.encode() not in content and secret.encode() not in content, f
        for static in (API_KEY, ADMIN_KEY):
            assert static.encode() not in content
    listed = client.get("/admin/keys", headers=ADMIN).json()["data"]
    assert [k["key_id"] for k in listed] == [key_id]
    assert "key" not in listed[0]


def test_revoked_key_is_refused(client: TestClient) -> None:
    key_id, key = create_key(client)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).status_code == 204
    assert client.get("/v1/models", headers=bearer(key)).status_code == 401
    assert client.delete(f"/admin/keys/{key_id}", headers=ADMIN).status_code == 404
    tampered = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    assert client.get("/v1/models", headers=bearer(tampered)).status_code == 401


def test_rate_limit_is_429_with_retry_after(client: TestClient) -> None:
    _, key = create_key(client, rate_limit_rpm=2)
    statuses = [client.get("/v1/models", headers=bearer(key)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(statuses[2].headers["retry-after"]) <= 30


def test_token_bucket_refills() -> None:
    limiter = RateLimiter()
    assert limiter.acquire("k", 60, now=0.0) == 0.0
    for _ in range(59):
        limiter.acquire("k", 60, now=0.0)
    assert limiter.acquire("k", 60, now=0.0) == pytest.approx(1.0)
    assert limiter.acquire("k", 60, now=1.0) == 0.0


def test_image_and_token_quotas_are_429_and_usage_is_listed(client: TestClient, png: bytes) -> None:
    key_id, key = create_key(client, quota_images=2, quota_tokens=10)
    ok = client.post("/v1/embeddings", json={"model": MODEL, "input": [data_url(png), data_url(png)]},
                     headers=bearer(key))
    assert ok.status_code == 200
    over = client.post("/v1/embeddings", json={"model": MODEL, "input": [data_url(png)]}, headers=bearer(key))
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(over.headers["retry-after"]) <= 86400
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": "a cat"}, headers=bearer(key)).status_code == 200
    long_text = client.post("/v1/embeddings", json={"model": MODEL, "input": "one two three four five six seven"},
                            headers=bearer(key))
    assert long_text.status_code == 429 and "token quota" in long_text.json()["error"]["message"]
    usage = client.get("/admin/usage", params={"key_id": key_id}, headers=ADMIN).json()["data"]
    assert len(usage) == 1
    assert (usage[0]["requests"], usage[0]["images"], usage[0]["tokens"]) == (2, 2, 4)  # "a cat" = sot a cat eot


def test_concurrent_requests_cannot_overrun_a_quota(client: TestClient, png: bytes) -> None:
    key_id, key = create_key(client, quota_images=3)
    body = {"model": MODEL, "input": [data_url(png)]}
    with ThreadPoolExecutor(6) as pool:  # all six are admitted before any finishes encoding
        statuses = sorted(pool.map(lambda _: client.post("/v1/embeddings", json=body, headers=bearer(key)).status_code,
                                   range(6)))
    assert statuses == [200, 200, 200, 429, 429, 429]
    usage = client.get("/admin/usage", params={"key_id": key_id}, headers=ADMIN).json()["data"]
    assert (usage[0]["requests"], usage[0]["images"]) == (3, 3)


def test_a_request_that_fails_in_the_model_is_not_charged(tiny_model, tmp_path: Path, png: bytes) -> None:
    app = create_app(settings_for(tmp_path), {MODEL: tiny_model})
    with TestClient(app, raise_server_exceptions=False) as client:
        key_id, key = create_key(client, quota_images=1)
        batched = app.state.server.pool.get(MODEL).batched

        def broken(rows):
            raise RuntimeError("device lost")

        body = {"model": MODEL, "input": [data_url(png)]}
        with mock.patch.object(batched.images, "_run", broken):
            assert client.post("/v1/embeddings", json=body, headers=bearer(key)).status_code == 500
        usage = client.get("/admin/usage", params={"key_id": key_id}, headers=ADMIN).json()["data"]
        assert (usage[0]["requests"], usage[0]["images"]) == (0, 0)
        assert client.post("/v1/embeddings", json=body, headers=bearer(key)).status_code == 200  # quota intact


def test_no_auth_serves_anyone_and_warns(tiny_model, tmp_path: Path, caplog) -> None:
    settings = settings_for(tmp_path, auth=AuthSettings(no_auth=True))
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings, {MODEL: tiny_model})) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models", headers=bearer("EMPTY")).status_code == 200
        disabled = client.get("/admin/keys")
        assert disabled.status_code == 401
        assert client.get("/admin/keys", headers=bearer("EMPTY")).status_code == 401
    assert any("authentication is disabled" in r.getMessage() for r in caplog.records)


def test_admin_routes_are_off_without_an_admin_key(tiny_model, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, auth=AuthSettings(api_keys=(API_KEY,)))
    with TestClient(create_app(settings, {MODEL: tiny_model})) as client:
        response = client.get("/admin/keys", headers=AUTH)
        assert response.status_code == 403 and "--admin-key" in response.json()["error"]["message"]


def test_admin_loads_and_unloads_models_at_run_time(client: TestClient, tiny_checkpoint: Path) -> None:
    loaded = client.post("/admin/models", json={"model": str(tiny_checkpoint), "alias": "second"}, headers=ADMIN)
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["id"] == "second"
    assert {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]} == {MODEL, "second"}
    assert client.post("/v1/embeddings", json={"model": "second", "input": "x"}, headers=AUTH).status_code == 200
    again = client.post("/admin/models", json={"model": str(tiny_checkpoint), "alias": "second"}, headers=ADMIN)
    assert again.status_code == 409
    bad = client.post("/admin/models", json={"model": "/no/such/dir"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_load_failed"
    assert client.delete("/admin/models/second", headers=ADMIN).status_code == 204
    gone = client.post("/v1/embeddings", json={"model": "second", "input": "x"}, headers=AUTH)
    assert gone.status_code == 404
    assert client.get("/ready").status_code == 200
