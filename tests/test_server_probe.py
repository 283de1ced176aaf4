"""Linear probes (`clipserve probe` output) served as fixed-class classifiers next to zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_server_support import AUTH, MODEL, data_url, photos, settings_for

from clipserve.api import create_app
from clipserve.api.settings import ModelSpec, ProbeSpec
from clipserve.cli.main import main
from clipserve.train.probe import LinearProbe


def write_probe(directory: Path, model_source: str, embed_dim: int = 64) -> LinearProbe:
    gen = torch.Generator().manual_seed(0)
    probe = LinearProbe(
        classes=("cat", "astronaut", "coffee"),
        weight=torch.randn(3, embed_dim, generator=gen) * 4,
        bias=torch.randn(3, generator=gen),
        model=model_source,
    )
    probe.save(directory)
    return probe


@pytest.fixture
def probe_client(tmp_path: Path, tiny_model):
    probe = write_probe(tmp_path / "pets", tiny_model.info.source)
    app = create_app(settings_for(tmp_path, probes=(ProbeSpec(tmp_path / "pets"),)), {MODEL: tiny_model})
    with TestClient(app) as client:
        yield client, probe


def test_classifier_serves_the_probe(probe_client, tiny_model) -> None:
    client, probe = probe_client
    (card,) = client.get("/v1/models", headers=AUTH).json()["data"]
    assert card["classifiers"] == ["pets"]
    images = photos()[:2]
    r = client.post("/v1/classifications", headers=AUTH,
                    json={"model": MODEL, "input": [data_url(p) for p in images], "classifier": "pets"})
    assert r.status_code == 200, r.text
    expected = probe.classify(tiny_model, images)
    for row, want in zip(r.json()["data"], expected, strict=True):
        got = {entry["label"]: entry["probability"] for entry in row["labels"]}
        assert set(got) == set(probe.classes)
        for i, name in enumerate(probe.classes):
            assert got[name] == pytest.approx(float(want[i]), abs=1e-5)
        probabilities = [entry["probability"] for entry in row["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_classifier_errors(probe_client) -> None:
    client, _ = probe_client
    image = data_url(photos()[0])
    r = client.post("/v1/classifications", headers=AUTH, json={"model": MODEL, "input": image, "classifier": "dogs"})
    assert r.status_code == 404 and "pets" in r.json()["error"]["message"]
    r = client.post("/v1/classifications", headers=AUTH,
                    json={"model": MODEL, "input": image, "classifier": "pets", "labels": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "labels"
    r = client.post("/v1/classifications", headers=AUTH, json={"model": MODEL, "input": image})
    assert r.status_code == 400


def test_serve_refuses_a_probe_no_model_takes(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    write_probe(tmp_path / "elsewhere", "some/other-model")
    code = main(["serve", "--model", f"{tiny_checkpoint}=a", "--model", f"{tiny_checkpoint}=b",
                 "--probe", str(tmp_path / "elsewhere"), "--no-auth", "--state-dir", str(tmp_path / "state")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no served model for probe" in err and "some/other-model" in err and "Traceback" not in err
    assert ModelSpec.parse("x=y").alias == "y"
