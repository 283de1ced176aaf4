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
    assert float(namespace["quick"][0] @ namespace["exact"][0]) > 0.995


def shell_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("clipserve ")]


def test_readme_commands_parse() -> None:
    """Every `clipserve ...` line in the README is accepted by the real argument parser."""
    import shlex

    from clipserve.cli.main import build_parser

    commands = shell_commands()
    assert len(commands) >= 10
    parser = build_parser()
    for line in commands:
        args = parser.parse_args(shlex.split(line)[1:])
        assert getattr(args, "func", None) is not None, line
