"""The collections HTTP routes, in-process against the server's app (auth, errors and quotas included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_server_support import AUTH, MODEL, data_url, photos, settings_for

from clipserve.api import create_app
from clipserve.collections import CollectionStore


@pytest.fixture
def client(tmp_path: Path, tiny_model):
    app = create_app(settings_for(tmp_path), {MODEL: tiny_model})
    app.state.collections = CollectionStore(tmp_path / "collections")
    with TestClient(app) as client:
        yield client


def test_collections_http_round_trip(client: TestClient) -> None:
    assert client.get("/v1/collections").status_code == 401
    r = client.post("/v1/collections", json={"name": "pics", "model": MODEL}, headers=AUTH)
    assert r.status_code == 201 and r.json()["items"] == 0
    assert client.post("/v1/collections", json={"name": "pics", "model": MODEL}, headers=AUTH).status_code == 409

    images = [data_url(p) for p in photos()]
    items = [{"image": images[0], "metadata": {"n": 0}}, {"image": images[1], "metadata": {"n": 1}},
             {"text": "a cat", "metadata": {"n": 2}}, {"image": images[2], "text": "coffee", "metadata": {"n": 3}},
             {"image": images[0]}]  # fmt: skip
    r = client.post("/v1/collections/pics/items", json={"items": items}, headers=AUTH)
    assert r.status_code == 200, r.text
    statuses = [d["status"] for d in r.json()["data"]]
    assert statuses == ["added"] * 4 + ["duplicate"] and r.json()["usage"]["prompt_tokens"] > 0
    ids = [d["id"] for d in r.json()["data"]]

    r = client.post("/v1/collections/pics/search", json={"image": images[1], "top_k": 2}, headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == ids[1]
    assert r.json()["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    r = client.post("/v1/collections/pics/search", json={"text": "a cat", "filter": {"n": {"$gte": 2}}}, headers=AUTH)
    assert [d["id"] for d in r.json()["data"]][0] == ids[2] and {d["metadata"]["n"] for d in r.json()["data"]} == {2, 3}
    embedding = client.get(f"/v1/collections/pics/items/{ids[3]}?embedding=true", headers=AUTH).json()["embedding"]
    r = client.post("/v1/collections/pics/search", json={"vector": embedding, "top_k": 1}, headers=AUTH)
    assert r.json()["data"][0]["id"] == ids[3] and r.json()["data"][0]["kind"] == "both"

    r = client.post("/v1/collections/pics/items/upload", files=[("files", ("x.png", photos()[3], "image/png"))],
                    data={"metadata": '{"n": 4}'}, headers=AUTH)  # fmt: skip
    assert r.json()["data"][0]["status"] == "added"
    assert client.get("/v1/collections/pics", headers=AUTH).json()["items"] == 5

    r = client.post("/v1/collections/pics/items", json={"items": [{"text": "ok"}, {"image": data_url(b"junk")}]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[1]"
    assert client.get("/v1/collections/pics", headers=AUTH).json()["items"] == 5  # nothing of a failed request
    r = client.post("/v1/collections/pics/search", json={"text": "x", "filter": {"n": {"$bad": 1}}}, headers=AUTH)
    assert r.status_code == 400 and "unknown operator" in r.json()["error"]["message"]
    assert client.post("/v1/collections/nope/search", json={"text": "x"}, headers=AUTH).status_code == 404

    assert client.delete(f"/v1/collections/pics/items/{ids[0]}", headers=AUTH).json()["deleted"] is True
    assert client.get(f"/v1/collections/pics/items/{ids[0]}", headers=AUTH).status_code == 404
    r = client.post("/v1/collections/pics/items/delete", json={"filter": {"n": {"$in": [1, 2]}}}, headers=AUTH)
    assert r.json()["deleted"] == 2
    assert client.delete("/v1/collections/pics", headers=AUTH).json()["deleted"] is True
    assert client.get("/v1/collections", headers=AUTH).json()["data"] == []
