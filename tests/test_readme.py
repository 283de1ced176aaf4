"""The README's Python examples run as written, against a local Hub serving a random-weight ViT-B-32 under
the default pretrained name (the real repository cannot be downloaded here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples(fake_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skimage import data

    from clipserve.config import PreprocessConfig
    from clipserve.io.checkpoints import write_directory
    from clipserve.models import CLIP
    from clipserve.registry import PRETRAINED, architecture

    default = PRETRAINED["ViT-B-32/datacomp_xl_s13b_b90k"]
    repo = tmp_path / "repo"
    cfg = architecture(default.architecture)
    write_directory(repo, CLIP(cfg).init_weights(0).state_dict(), cfg, PreprocessConfig())
    fake_hub.add_repo(default.hf_repo, repo)

    monkeypatch.chdir(tmp_path)
    Image.fromarray(data.chelsea()).save("cat.jpg")
    Image.fromarray(data.astronaut()).save("dog.jpg")
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    assert namespace["probs"].shape == (2, 2)
    assert namespace["similarity"].shape == (2, 2)
