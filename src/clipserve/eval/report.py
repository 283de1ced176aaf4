"""Evaluation results: CLIP_benchmark's JSON (strict: no NaN), the terminal table and side-by-side comparison."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_KEYS: tuple[str, ...] = ("dataset", "model", "pretrained", "task", "metrics", "language")


class ResultFileError(ValueError):
    """A results file that cannot be read as an evaluation result; the message names the file."""


@dataclass(frozen=True)
class EvalResult:
    """The record CLIP_benchmark's `eval` writes, with the same keys."""

    dataset: str
    model: str
    pretrained: str
    task: str
    metrics: dict[str, float]
    language: str

    def to_json(self) -> str:
        """Strict JSON: a non-finite metric is a bug, not something to write as NaN."""
        for name, value in self.metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"metric {name} is {value}; refusing to write non-strict JSON")
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def write(self, path: str | Path) -> None:
        path = Path(path)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")


def read_result(path: str | Path) -> EvalResult:
    """An `EvalResult` from a JSON file written by clipserve or CLIP_benchmark (whose NaN acc5 is dropped)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ResultFileError(f"{path}: expected a JSON object with {', '.join(RESULT_KEYS)}")
    missing = [key for key in RESULT_KEYS if key not in data]
    if missing:
        raise ResultFileError(f"{path}: not an evaluation result, missing {', '.join(missing)}")
    metrics = data["metrics"]
    if not isinstance(metrics, dict):
        raise ResultFileError(f"{path}: field 'metrics' must be an object")
    numbers = {
        name: value
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    return EvalResult(*(str(data[key]) for key in RESULT_KEYS[:4]), numbers, str(data["language"]))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_result(result: EvalResult) -> str:
    """A short table: what was evaluated, then one metric per row."""
    heading = f"{result.task} on {result.dataset} ({result.language}): {result.model} {result.pretrained}"
    rows = [("metric", "value")] + [(name, format_value(value)) for name, value in result.metrics.items()]
    return heading + "\n" + _table(rows)


def format_comparison(results: Sequence[EvalResult], labels: Sequence[str]) -> str:
    """One column per result, one row per metric (union, in order of first appearance); `-` where absent."""
    names: dict[str, None] = {}
    for result in results:
        names.update(dict.fromkeys(result.metrics))
    rows: list[Sequence[str]] = [("", *labels)]
    for key in ("model", "pretrained", "dataset", "task", "language"):
        rows.append((key, *(str(getattr(result, key)) for result in results)))
    for name in names:
        rows.append((name, *(format_value(r.metrics[name]) if name in r.metrics else "-" for r in results)))
    return _table(rows)
