"""Shared fixtures. Tests never touch the network: checkpoints are written by the tests themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracles.py, tests/checkpoint_factory.py
pytest_plugins = ["fixtures_digits"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(__file__).parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def write_tiny_checkpoint(directory: Path, seed: int = 0, layout: str = "open_clip") -> Path:
    """A tiny random CLIP (32 px images, 2 layers per tower) in the open_clip layout, written with our own
    writer: fast enough for every test that needs a model but not its numbers."""
    from clipserve.config import PreprocessConfig, model_config_from_open_clip
    from clipserve.io.checkpoints import write_directory
    from clipserve.models import CLIP

    cfg = model_config_from_open_clip(TINY_CONFIG, "tiny")
    module = CLIP(cfg).init_weights(seed)
    return write_directory(directory, module.state_dict(), cfg, PreprocessConfig(size=32), layout)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    import clipserve

    # fp32 by name: `auto` is int8 on VNNI CPUs, and the tests that compare against oracles need the exact path
    return clipserve.load(str(tiny_checkpoint), precision="fp32")


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A loopback Hub (see hub_server.py) with an empty cache; huggingface_hub is pointed at it."""
    from hub_server import FakeHub
    from huggingface_hub import constants

    with FakeHub() as hub:
        cache = tmp_path / "hf-cache"
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield hub
