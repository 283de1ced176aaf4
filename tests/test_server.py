"""The server end to end: the official openai SDK, httpx and raw HTTP against a real uvicorn on loopback,
and the FastAPI TestClient for the rest. Vectors must equal `Model.encode_*(..., normalize=True)`."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from test_server_support import (
    API_KEY,
    AUTH,
    MODEL,
    data_url,
    live_server,
    photos,
    settings_for,
)

from clipserve.api import create_app
from clipserve.api.routes import BACKGROUND_LABEL
from clipserve.engine.batching import BatchSettings
from clipserve.eval.prompts import imagenet_templates

TEXTS = ["a photo of an astronaut", "a cat", "coffee", "a man with a camera on a tripod, black and white"]
TOL = 1e-5


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return photos()


@pytest.fixture(scope="module")
def server_url(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    with live_server(settings_for(tmp_path_factory.mktemp("live")), {MODEL: tiny_model}) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def client(tiny_model, tmp_path: Path):
    with TestClient(create_app(settings_for(tmp_path), {MODEL: tiny_model})) as c:
        yield c


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


# -- openai SDK ----------------------------------------------------------------------------------------


def test_sdk_text_embeddings_default_base64_match_model(sdk: openai.OpenAI, tiny_model) -> None:
    response = sdk.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 by default
    expected = tiny_model.encode_text(TEXTS, normalize=True).numpy()
    got = vectors(response)
    assert got.shape == expected.shape == (len(TEXTS), tiny_model.embed_dim)
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert response.model == MODEL
    counts = tiny_model.tokenizer.count_tokens(TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(counts)


def test_sdk_float_encoding_matches_model(sdk: openai.OpenAI, tiny_model) -> None:
    response = sdk.embeddings.create(model=MODEL, input="a cat", encoding_format="float")
    np.testing.assert_allclose(vectors(response)[0], tiny_model.encode_text(["a cat"], normalize=True)[0], atol=TOL)
    assert np.linalg.norm(vectors(response)[0]) == pytest.approx(1.0, abs=1e-5)


def test_sdk_images_through_extra_body_match_model(sdk: openai.OpenAI, tiny_model, images: list[bytes]) -> None:
    expected = tiny_model.encode_image(images, normalize=True).numpy()
    # Infinity's modality field with raw base64 and data URLs.
    infinity = sdk.embeddings.create(
        model=MODEL,
        input=[base64.b64encode(images[0]).decode(), data_url(images[1], "image/jpeg")],
        extra_body={"modality": "image"},
    )
    np.testing.assert_allclose(vectors(infinity), expected[:2], atol=TOL)
    # Jina-style tagged objects and chat parts, mixed with text, through extra_body's input override.
    mixed = sdk.embeddings.create(
        model=MODEL,
        input=["placeholder"],
        encoding_format="float",
        extra_body={"input": [
            {"image": data_url(images[2], "image/jpeg")},
            {"text": TEXTS[0]},
            {"type": "image_url", "image_url": {"url": data_url(images[3])}},
            {"type": "text", "text": TEXTS[1]},
            data_url(images[0]),
        ]},
    )
    got = vectors(mixed)
    text_expected = tiny_model.encode_text(TEXTS[:2], normalize=True).numpy()
    np.testing.assert_allclose(got[[0, 2, 4]], expected[[2, 3, 0]], atol=TOL)
    np.testing.assert_allclose(got[[1, 3]], text_expected, atol=TOL)
    grid = tiny_model.config.vision.grid_size
    text_tokens = sum(tiny_model.tokenizer.count_tokens(TEXTS[:2]))
    assert mixed.usage.prompt_tokens == 3 * (grid * grid + 1) + text_tokens


def test_sdk_lists_models(sdk: openai.OpenAI, tiny_model) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert card["embed_dim"] == tiny_model.embed_dim
    assert card["image_size"] == 32
    assert card["context_length"] == 77


def test_sdk_errors_are_typed(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.embeddings.create(model="no-such-model", input="x")
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.embeddings.create(model=MODEL, input="x", dimensions=3)
    assert bad.value.body["param"] == "dimensions"
    wrong_key = openai.OpenAI(base_url=sdk.base_url, api_key="wrong-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.embeddings.create(model=MODEL, input="x")


# -- httpx and raw HTTP --------------------------------------------------------------------------------


def test_httpx_embeddings_with_request_id(server_url: str, tiny_model) -> None:
    response = httpx.post(
        f"{server_url}/v1/embeddings",
        json={"model": MODEL, "input": ["a cat"], "dimensions": tiny_model.embed_dim, "user": "u1"},
        headers={**AUTH, "X-Request-ID": "req-42"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    body = response.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(body["data"][0]["embedding"], tiny_model.encode_text(["a cat"], normalize=True)[0],
                               atol=TOL)
    generated = httpx.get(f"{server_url}/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != "req-42"


def test_raw_http_base64_is_little_endian_float32(server_url: str, tiny_model) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": MODEL, "input": "coffee", "encoding_format": "base64"})
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json", **AUTH})
    response = conn.getresponse()
    assert response.status == 200
    payload = json.loads(response.read())
    conn.close()
    vector = np.frombuffer(base64.b64decode(payload["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, tiny_model.encode_text(["coffee"], normalize=True)[0], atol=TOL)


def test_multipart_upload_embeddings(server_url: str, tiny_model, images: list[bytes]) -> None:
    files = [("files", ("a.png", images[0], "image/png")), ("files", ("b.jpg", images[1], "image/jpeg"))]
    response = httpx.post(f"{server_url}/v1/embeddings/upload", data={"model": MODEL}, files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    np.testing.assert_allclose(got, tiny_model.encode_image(images[:2], normalize=True), atol=TOL)


# -- classification and ranking ------------------------------------------------------------------------


def test_classification_matches_model_and_sorts(client: TestClient, tiny_model, images: list[bytes]) -> None:
    labels = ["astronaut", "cat", "coffee", "camera"]
    response = client.post(
        "/v1/classifications",
        json={"model": MODEL, "input": [data_url(images[0]), {"image": data_url(images[1])}], "labels": labels},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = tiny_model.classify(images[:2], labels)
    classifier = tiny_model.text_classifier(labels)
    cosines = tiny_model.encode_image(images[:2], normalize=True) @ classifier.T
    for i, entry in enumerate(data):
        probabilities = [x["probability"] for x in entry["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        for x in entry["labels"]:
            j = labels.index(x["label"])
            assert x["probability"] == pytest.approx(float(expected[i, j]), abs=1e-5)
            assert x["score"] == pytest.approx(float(cosines[i, j]), abs=1e-5)


def test_classification_imagenet_templates_top_k_and_cache(client: TestClient, tiny_model, images) -> None:
    labels = ["dog", "bird", "car"]
    before = len(tiny_model.label_cache)
    texts = client.app.state.server.pool.get(MODEL).batched.texts
    batches_before = texts.batches_run
    for image in images[:3]:
        response = client.post(
            "/v1/classifications",
            json={"model": MODEL, "input": data_url(image), "labels": labels, "templates": "imagenet", "top_k": 2},
            headers=AUTH,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["labels"]) == 2
    key = (tuple(labels), tuple(imagenet_templates("en")))
    classifier = tiny_model.label_cache.get(key)
    assert classifier is not None  # one text pass, cached for the next images
    assert len(tiny_model.label_cache) == before + 1
    # the 3 x 80 prompts ran through the server's text batcher (batches of at most 16), not beside it
    assert texts.batches_run - batches_before >= 3 * 80 // 16
    prompts = tiny_model.encode_text(tiny_model.classifier_prompts(labels, key[1])[1], normalize=True)
    expected = torch.nn.functional.normalize(prompts.view(3, 80, -1).mean(dim=1), dim=-1)
    torch.testing.assert_close(classifier, expected, atol=1e-5, rtol=0)


def test_multi_label_is_per_label_two_way_softmax(client: TestClient, tiny_model, images) -> None:
    labels = ["astronaut", "flag", "helmet"]
    response = client.post(
        "/v1/classifications",
        json={"model": MODEL, "input": [data_url(images[0])], "labels": labels, "multi_label": True},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    image = tiny_model.encode_image(images[:1], normalize=True)
    background = image @ tiny_model.text_classifier([BACKGROUND_LABEL]).T
    cosine = image @ tiny_model.text_classifier(labels).T
    scale = float(np.exp(tiny_model.logit_scale))
    expected = torch.sigmoid(scale * (cosine - background))[0]
    got = {x["label"]: x["probability"] for x in response.json()["data"][0]["labels"]}
    for j, label in enumerate(labels):
        assert got[label] == pytest.approx(float(expected[j]), abs=1e-5)


def test_classification_upload(client: TestClient, images) -> None:
    response = client.post(
        "/v1/classifications/upload",
        data={"model": MODEL, "labels": ["cat", "astronaut"], "top_k": "1"},
        files=[("files", ("a.jpg", images[1], "image/jpeg"))],
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["labels"]) == 1


def test_ranking_text_query_against_images_and_texts(client: TestClient, tiny_model, images) -> None:
    candidates = [data_url(images[0]), "a cat", {"image": data_url(images[1])}, {"text": "coffee"}]
    response = client.post(
        "/v1/rankings", json={"model": MODEL, "query": "an astronaut", "candidates": candidates, "top_n": 3},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    query = tiny_model.encode_text(["an astronaut"], normalize=True)[0]
    cand = torch.cat([
        tiny_model.encode_image([images[0]], normalize=True), tiny_model.encode_text(["a cat"], normalize=True),
        tiny_model.encode_image([images[1]], normalize=True), tiny_model.encode_text(["coffee"], normalize=True),
    ])
    scores = cand @ query
    assert [d["index"] for d in data] == torch.argsort(scores, descending=True)[:3].tolist()
    for d in data:
        assert d["score"] == pytest.approx(float(scores[d["index"]]), abs=1e-5)
    all_probs = (np.exp(tiny_model.logit_scale) * scores).softmax(0)
    assert data[0]["probability"] == pytest.approx(float(all_probs.max()), abs=1e-5)


# -- batching, isolation, readiness, metrics -----------------------------------------------------------


def _batch_stats(app, modality: str) -> tuple[float, float]:
    registry = app.state.server.metrics.registry
    labels = {"model": MODEL, "modality": modality}
    count = registry.get_sample_value("clipserve_batch_size_count", labels) or 0.0
    total = registry.get_sample_value("clipserve_batch_size_sum", labels) or 0.0
    return count, total


def test_concurrent_requests_coalesce_and_get_their_own_results(tiny_model, tmp_path: Path, images) -> None:
    n = 4
    settings = settings_for(tmp_path, batching=BatchSettings(max_batch_size=n, max_wait_ms=2000, max_queue=64))
    app = create_app(settings, {MODEL: tiny_model})
    expected = tiny_model.encode_image(images, normalize=True).numpy()
    with TestClient(app) as client:
        count0, sum0 = _batch_stats(app, "image")
        results: dict[int, np.ndarray] = {}

        def call(i: int) -> None:
            r = client.post("/v1/embeddings", json={"model": MODEL, "input": [{"image": data_url(images[i])}]},
                            headers=AUTH)
            assert r.status_code == 200, r.text
            results[i] = np.array(r.json()["data"][0]["embedding"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        count1, sum1 = _batch_stats(app, "image")
    # A 2 s wait, cut short only by a full batch: the four requests ran as one batch of four.
    assert (count1 - count0, sum1 - sum0) == (1, n)
    for i in range(n):
        np.testing.assert_allclose(results[i], expected[i], atol=TOL)


def test_corrupt_image_fails_only_its_request(tiny_model, tmp_path: Path, images) -> None:
    settings = settings_for(tmp_path, batching=BatchSettings(max_batch_size=8, max_wait_ms=300, max_queue=64))
    app = create_app(settings, {MODEL: tiny_model})
    corrupt = images[0][: len(images[0]) // 3]  # a truncated PNG
    expected = tiny_model.encode_image(images[1:3], normalize=True).numpy()
    statuses: dict[str, httpx.Response] = {}
    with TestClient(app) as client:
        def call(name: str, payload: list) -> None:
            statuses[name] = client.post("/v1/embeddings", json={"model": MODEL, "input": payload}, headers=AUTH)

        jobs = {
            "good1": ["a cat", data_url(images[1])],
            "bad": [data_url(images[1]), data_url(corrupt), "text"],
            "good2": [data_url(images[2])],
        }
        threads = [threading.Thread(target=call, args=item) for item in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses["bad"].status_code == 400
        error = statuses["bad"].json()["error"]
        assert error["param"] == "input[1]" and "input[1]" in error["message"]
        assert statuses["good1"].status_code == statuses["good2"].status_code == 200
        np.testing.assert_allclose(statuses["good1"].json()["data"][1]["embedding"], expected[0], atol=TOL)
        np.testing.assert_allclose(statuses["good2"].json()["data"][0]["embedding"], expected[1], atol=TOL)
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        registry = app.state.server.metrics.registry
        assert registry.get_sample_value("clipserve_images_decoded_total", {"model": MODEL, "outcome": "error"}) == 1


def test_ready_reports_a_broken_model_then_recovers(tiny_model, tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path), {MODEL: tiny_model})
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/ready").status_code == 200
        batched = app.state.server.pool.get(MODEL).batched
        original = batched.texts._run

        def broken(rows):
            raise RuntimeError("device lost")

        batched.texts._run = broken
        try:
            failed = client.post(
                "/v1/embeddings", json={"model": MODEL, "input": "x"}, headers={**AUTH, "X-Request-ID": "trace-7"}
            )
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
            assert failed.headers["X-Request-ID"] == "trace-7" and "trace-7" in failed.json()["error"]["message"]
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert "probe failed" in ready.json()["models"][MODEL]
        finally:
            batched.texts._run = original
        assert client.get("/ready").status_code == 200  # re-probed


def test_metrics_expose_requests_batches_queue_and_errors(client: TestClient) -> None:
    client.post("/v1/embeddings", json={"model": MODEL, "input": "a"}, headers=AUTH)
    client.post("/v1/embeddings", json={"model": "nope", "input": "a"}, headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert 'clipserve_requests_total{model="tiny",route="/v1/embeddings",status="200"} 1.0' in text
    assert 'clipserve_request_seconds_count{model="tiny",route="/v1/embeddings"} 1.0' in text
    assert 'clipserve_batch_size_count{modality="text",model="tiny"}' in text
    assert 'clipserve_queue_depth{model="tiny",stage="image"} 0.0' in text
    assert 'clipserve_errors_total{type="model_not_found"} 1.0' in text
