"""Zero-shot prompts: the packaged ImageNet class names and templates, and user prompt files.

The packaged lists (see `data/README.md` for their source) are what the published ImageNet numbers were
computed with; the server reuses `imagenet_templates("en")` for requests that ask for `"templates": "imagenet"`.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

# CLIP_benchmark's language codes for ImageNet (note `jp`, not `ja`; `cn`, not `zh`).
LANGUAGES: tuple[str, ...] = ("en", "it", "jp", "cn", "ar")


class PromptFileError(ValueError):
    """A templates or class-names file that cannot be used; the message names the file."""


@cache
def _imagenet(language: str) -> dict[str, Any]:
    if language not in LANGUAGES:
        raise ValueError(f"no packaged ImageNet prompts for language {language!r}; known: {', '.join(LANGUAGES)}")
    text = resources.files("clipserve.eval").joinpath("data", f"imagenet1k_{language}.json").read_text("utf-8")
    return json.loads(text)


def imagenet_classnames(language: str = "en") -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (sorted synset ids)."""
    return list(_imagenet(language)["classnames"])


def imagenet_templates(language: str = "en") -> list[str]:
    """The ImageNet zero-shot templates for `language` (80 OpenAI templates for `en`); `{c}` marks the label."""
    return list(_imagenet(language)["templates"])


def read_lines(path: str | Path, what: str) -> list[str]:
    """A list of strings from a `.json` file (a JSON list) or a text file (one entry per line, blanks skipped).

    `what` names the content in error messages ("templates", "class names").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"{path}: cannot read {what}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise PromptFileError(f"{path}: {what} must be a JSON list of strings")
        items = [item.strip() for item in items]
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [item for item in items if item]
    if not items:
        raise PromptFileError(f"{path}: no {what} in the file")
    return items


def read_templates(path: str | Path) -> list[str]:
    """Templates from a file; each must contain `{c}` or `{}` where the class name goes."""
    templates = read_lines(path, "templates")
    for template in templates:
        if "{c}" not in template and "{}" not in template:
            raise PromptFileError(f"{path}: template {template!r} has no {{c}} or {{}} placeholder")
    return templates


def read_classnames(path: str | Path) -> list[str]:
    """Class names from a file, in class-index order."""
    return read_lines(path, "class names")
